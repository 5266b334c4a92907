// The System page: CPU, memory, the gateway and model server processes, GPUs; polled
// every 2 seconds.

import { $, h } from "../dom.js";
import { admin } from "../api.js";
import { fmtBytes, fmtPercent } from "../format.js";
import { polled, startPolling } from "../polling.js";

export function enter() {
  startPolling(polled("system", loadSystem), 2000);
}

async function loadSystem() {
  renderSystem(await admin("GET", "/admin/system"));
}

function setMeter(fill, percent) {
  const p = Math.max(0, Math.min(100, Number(percent) || 0));
  fill.style.width = `${p}%`;
  fill.parentElement.classList.toggle("hot", p >= 90);
}

function facts(list, pairs) {
  list.replaceChildren(...pairs.flatMap(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]));
}

function renderSystem(report) {
  const cpu = report.cpu || {};
  $("system-cpu-total").textContent = fmtPercent(cpu.usage_percent);
  setMeter($("system-cpu-fill"), cpu.usage_percent);
  $("system-cpu-cores").textContent = cpu.cores ? `${cpu.cores} core${cpu.cores === 1 ? "" : "s"}` : "";
  $("system-cpu-percore").replaceChildren(
    ...(cpu.per_core_percent || []).map((p, i) => {
      return h("div", { class: "core", title: `core ${i}: ${fmtPercent(p)}` }, `#${i} ${fmtPercent(p)}`, h("div", { class: "meter" }, meterFill(p)));
    }),
  );

  const memory = report.memory || {};
  const memPercent = memory.total_bytes ? (memory.used_bytes / memory.total_bytes) * 100 : 0;
  const used = $("system-memory-used");
  used.replaceChildren(fmtBytes(memory.used_bytes), " ", h("small", {}, `of ${fmtBytes(memory.total_bytes)}`));
  setMeter($("system-memory-fill"), memPercent);
  $("system-memory-detail").textContent = `${fmtPercent(memPercent)} used · ${fmtBytes(Math.max(0, memory.total_bytes - memory.used_bytes))} free`;

  const gateway = report.gateway;
  facts($("system-gateway-facts"), gateway ? [["PID", String(gateway.pid)], ["Memory", fmtBytes(gateway.memory_bytes)], ["CPU", fmtPercent(gateway.cpu_percent)]] : [["State", "unknown"]]);

  const server = report.model_server;
  if (server) {
    facts($("system-model-facts"), [["PID", String(server.pid)], ["Memory", fmtBytes(server.memory_bytes)], ["CPU", fmtPercent(server.cpu_percent)]]);
  } else {
    $("system-model-facts").replaceChildren(h("p", { class: "muted" }, "No model server is running under llmgate."));
  }

  const gpu = report.gpu || {};
  const devices = gpu.devices || [];
  $("system-gpu-list").replaceChildren(...devices.map(gpuCard));
  const gpuMessage = gpu.message || "no GPU found";
  $("system-gpu-message").textContent = devices.length ? "" : gpuMessage[0].toUpperCase() + gpuMessage.slice(1);
}

/** A meter's fill for a new element (no transition: it is drawn at its width at once). */
function meterFill(percent) {
  const fill = h("div", { class: "meter-fill" });
  fill.style.width = `${Math.max(0, Math.min(100, Number(percent) || 0))}%`;
  return fill;
}

function gpuCard(device) {
  const memPercent = device.memory_total_bytes ? (device.memory_used_bytes / device.memory_total_bytes) * 100 : null;
  const dl = h("dl", { class: "facts" });
  facts(dl, [
    ["Temperature", typeof device.temperature_celsius === "number" ? `${Math.round(device.temperature_celsius)} °C` : "—"],
    ["Power", typeof device.power_watts === "number" ? `${device.power_watts.toFixed(0)} W` : "—"],
  ]);
  return h(
    "div",
    { class: "card gpu", "data-testid": "system-gpu-device" },
    h("h3", {}, `#${device.index} ${device.name || "GPU"}`),
    h("div", { class: "core" }, `Utilisation ${fmtPercent(device.utilization_percent)}`),
    h("div", { class: "meter" }, meterFill(device.utilization_percent)),
    h("div", { class: "core" }, `Memory ${fmtBytes(device.memory_used_bytes)} of ${fmtBytes(device.memory_total_bytes)}`),
    h("div", { class: "meter" }, meterFill(memPercent)),
    dl,
  );
}
