// Numbers, sizes and times as a person reads them, in the browser's locale.

import { h } from "./dom.js";

const numberFormat = new Intl.NumberFormat();
export const fmtInt = (n) => (n === null || n === undefined ? "—" : numberFormat.format(n));
export const fmtPercent = (p) => (typeof p === "number" && isFinite(p) ? `${p.toFixed(p < 10 ? 1 : 0)}%` : "—");

export function fmtBytes(bytes) {
  if (typeof bytes !== "number" || !isFinite(bytes)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 || value >= 100 ? 0 : 1)} ${units[unit]}`;
}

export function fmtCompact(n) {
  if (n >= 1e6) return `${+(n / 1e6).toFixed(1)}M`;
  if (n >= 1e4) return `${+(n / 1e3).toFixed(0)}k`;
  if (n >= 1e3) return `${+(n / 1e3).toFixed(1)}k`;
  return String(n);
}

const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
export const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });
export const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
export const dayFormat = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short" });
export const dayTimeFormat = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" });

export function parseTime(value) {
  if (!value) return null;
  const t = Date.parse(value);
  return isNaN(t) ? null : t;
}

export function fmtDateTime(value) {
  const t = parseTime(value);
  return t === null ? "—" : dateTimeFormat.format(t);
}

export function fmtAgo(value, never) {
  const t = parseTime(value);
  if (t === null) return never || "never";
  const seconds = Math.round((Date.now() - t) / 1000);
  if (seconds < 5) return "just now";
  if (seconds < 60) return `${seconds} s ago`;
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `${minutes} min ago`;
  const hours = Math.round(minutes / 60);
  if (hours < 48) return `${hours} h ago`;
  return dateTimeFormat.format(t);
}

/** A time element: relative text, the full local time on hover. */
export function timeCell(value, never) {
  const t = parseTime(value);
  return h("time", { datetime: value || null, title: t === null ? null : fullFormat.format(t) }, fmtAgo(value, never));
}
