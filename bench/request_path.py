#!/usr/bin/env python3
"""The request path's instructions per request, from a profile kept by
`KEEP=dir bench/instructions.sh N`: the inclusive count of the connection's answer future
(`http::AnswerFuture::poll`) and of `App::call`, divided by N. That is a request from its
arrival to its answer's head (auth, reading the body, routing, the proxy call), without
the streaming of the body or the usage writer, whose share follows the pace of the run.

    bench/request_path.py dir/llmgate.<pid>.1 4000

callgrind_annotate splits a function by the source file of the code inlined into it;
this adds up each function whole (its own instructions and its calls'), from the
callgrind format directly. Needs only Python 3.
"""
import re
import sys
from collections import defaultdict

ROOTS = {
    "answer future": re.compile(r"<llmgate_server::http::AnswerFuture as core::future::future::Future>::poll$"),
    "App::call": re.compile(r"<llmgate_server::app::App as tower_service::Service<.*>>::call$"),
}


def inclusive(path):
    names, fn, cfn, call = {}, None, None, False
    cost = defaultdict(int)

    def name(text):
        m = re.match(r"\((\d+)\)(?: (.*))?", text)
        if not m:
            return text
        if m.group(2) is not None:
            names[m.group(1)] = m.group(2)
        return names[m.group(1)]

    with open(path) as profile:
        for line in profile:
            if line.startswith("fn="):
                fn = name(line[3:].rstrip("\n"))
            elif line.startswith("cfn="):
                cfn = name(line[4:].rstrip("\n"))
            elif line.startswith("calls="):
                call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if not call or cfn != fn:  # a call to itself is counted in its own lines
                    cost[fn] += int(parts[1]) if len(parts) > 1 else 0
                call = False
    return cost


def main():
    path, requests = sys.argv[1], int(sys.argv[2])
    cost = inclusive(path)
    total = 0
    for label, pattern in ROOTS.items():
        found = sum(v for f, v in cost.items() if pattern.search(f))
        print(f"{label}: {found / requests:.0f}")
        total += found
    print(f"request path: {total / requests:.0f} instructions per request")


if __name__ == "__main__":
    main()
