// Bar charts as inline SVG, drawn from numbers with no library.

import { svg } from "./dom.js";
import { fmtCompact, fmtInt } from "./format.js";

function niceMax(value) {
  if (value <= 0) return 1;
  const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * magnitude >= value) return step * magnitude;
  }
  return 10 * magnitude;
}

/** A bar chart (stacked when several series) as inline SVG; hover a bar for its numbers. */
export function barChart({ width, title, buckets, size, label, series }) {
  const height = 150;
  const pad = { top: 24, right: 8, bottom: 22, left: 44 };
  const innerW = width - pad.left - pad.right;
  const innerH = height - pad.top - pad.bottom;
  const total = (b) => series.reduce((sum, s) => sum + b[s.key], 0);
  const max = Math.max(2, niceMax(Math.max(...buckets.map(total))));
  const y = (v) => pad.top + innerH - (v / max) * innerH;
  const step = innerW / buckets.length;
  const barW = Math.max(1, step * 0.78);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": title });
  root.append(svg("text", { x: 0, y: 12, class: "chart-title", text: title }));
  // Counts are whole numbers: no half-way line where it would read "2.5 requests".
  for (const v of Number.isInteger(max / 2) ? [0, max / 2, max] : [0, max]) {
    root.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v), class: v === 0 ? "axis" : "grid-line" }));
    root.append(svg("text", { x: pad.left - 6, y: y(v) + 4, "text-anchor": "end", text: fmtCompact(Math.round(v * 10) / 10) }));
  }
  const labelEvery = Math.max(1, Math.ceil(buckets.length / Math.max(2, Math.floor(innerW / 80))));
  buckets.forEach((b, i) => {
    const x = pad.left + i * step + (step - barW) / 2;
    let base = 0;
    const group = svg("g", {});
    for (const s of series) {
      const v = b[s.key];
      if (v > 0) {
        group.append(svg("rect", { x, y: y(base + v), width: barW, height: Math.max(1, y(base) - y(base + v)), class: s.cls, rx: Math.min(2, barW / 3) }));
      }
      base += v;
    }
    const words = series.map((s) => `${fmtInt(b[s.key])} ${s.name}`).join(", ");
    const target = svg("rect", { x: pad.left + i * step, y: pad.top, width: step, height: innerH, class: "hover-target" });
    target.append(svg("title", { text: `${label(b.t)}–${label(b.t + size)}: ${words}` }));
    group.append(target);
    root.append(group);
    if (i % labelEvery === 0) {
      // Labels near either edge are anchored inside the chart so they are not cut off.
      const center = pad.left + i * step + step / 2;
      let anchor = "middle";
      let x = center;
      if (center - 32 < 0) {
        anchor = "start";
        x = Math.max(0, pad.left + i * step);
      } else if (center + 32 > width) {
        anchor = "end";
        x = width - 1;
      }
      root.append(svg("text", { x, y: height - 6, "text-anchor": anchor, text: label(b.t) }));
    }
  });
  return root;
}
