// SVG charts for the dashboard, written for it: no library, no outside asset.
// Line charts have one x tick per epoch (thinned when crowded), skip missing values, and draw a dot
// for every point, so a curve with a single epoch is still visible.

const SVG_NS = "http://www.w3.org/2000/svg"; // an XML namespace name, not a download

export const PALETTE = [
  "#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c",
  "#0891b2", "#be185d", "#4d7c0f", "#7c3aed", "#b45309",
];

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

// "Nice" tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
export function niceTicks(lo, hi, count = 5) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  if (lo === hi) {
    const pad = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1;
    lo -= pad;
    hi += pad;
  }
  const raw = (hi - lo) / count;
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => raw <= s) || 10 * power;
  const ticks = [];
  for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(Number(v.toPrecision(12)));
  }
  if (ticks[ticks.length - 1] < hi) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

function formatTick(value, format, digits = 0) {
  if (format === "percent") return `${(value * 100).toFixed(digits)}%`;
  if (format === "exp") return value === 0 ? "0" : value.toExponential(digits);
  if (Math.abs(value) >= 1000) return value.toFixed(0);
  return String(Number(value.toPrecision(3 + digits)));
}

// Labels for ticks with as few digits as keep neighbours distinct (1e-3, 1.05e-3 — never 1e-3 twice).
function tickLabels(ticks, format) {
  for (let digits = 0; digits < 6; digits++) {
    const labels = ticks.map((t) => formatTick(t, format, digits));
    if (new Set(labels).size === labels.length) return labels;
  }
  return ticks.map((t) => formatTick(t, format, 6));
}

/**
 * A line chart.
 * options: {title, series: [{name, color, dashed, points: [[x, y], ...]}], xLabel, yFormat
 *           ("number" | "percent" | "exp"), yMin, yMax, floor, ceil, logY, width, height, id}
 * Every point is a <circle class="point" data-series="name" data-x="epoch">, which the browser
 * test counts to know how far the curve has grown.
 */
export function lineChart(options) {
  const width = options.width || 520;
  const height = options.height || 280;
  const margin = { top: 30, right: 16, bottom: 40, left: 56 };
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const svg = el("svg", {
    viewBox: `0 0 ${width} ${height}`,
    class: "chart",
    role: "img",
    "aria-label": options.title || "chart",
    id: options.id,
  });
  svg.appendChild(el("text", { x: margin.left, y: 18, class: "chart-title" }, options.title || ""));

  const series = (options.series || []).map((s) => ({
    ...s,
    points: (s.points || []).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!options.logY || y > 0)),
  }));
  const all = series.flatMap((s) => s.points);
  if (all.length === 0) {
    svg.appendChild(el("text", { x: width / 2, y: height / 2, class: "chart-empty", "text-anchor": "middle" },
      options.empty || "no data yet"));
    return svg;
  }

  const xs = all.map((p) => p[0]);
  const xMin = Math.min(...xs, 1);
  const xMax = Math.max(...xs, xMin + 1);
  const transform = options.logY ? Math.log10 : (v) => v;
  const ys = all.map((p) => transform(p[1]));
  let yLo = options.yMin !== undefined ? options.yMin : Math.min(...ys);
  let yHi = options.yMax !== undefined ? options.yMax : Math.max(...ys);
  if (options.yMin === undefined && options.yMax === undefined && !options.logY) {
    const pad = (yHi - yLo) * 0.08 || Math.abs(yHi) * 0.1 || 0.1;
    yLo -= pad;
    yHi += pad;
  }
  // Losses and learning rates are never negative, accuracies never above 100%: no axis beyond that.
  if (options.floor !== undefined) yLo = Math.max(yLo, options.floor);
  if (options.ceil !== undefined) yHi = Math.min(yHi, options.ceil);
  let yTicks = niceTicks(yLo, yHi, 5);
  if (options.floor !== undefined) yTicks = yTicks.filter((t) => t >= options.floor - 1e-12);
  if (options.ceil !== undefined) yTicks = yTicks.filter((t) => t <= options.ceil + 1e-12);
  if (options.logY) {
    yTicks = [];
    for (let e = Math.floor(yLo); e <= Math.ceil(yHi); e++) yTicks.push(e);
    if (yTicks.length < 2) yTicks = [Math.floor(yLo) - 1, Math.ceil(yHi) + 1];
  }
  yLo = Math.min(yLo, yTicks[0]);
  yHi = Math.max(yHi, yTicks[yTicks.length - 1]);
  const sx = (x) => margin.left + ((x - xMin) / (xMax - xMin)) * plotW;
  const sy = (y) => margin.top + plotH - ((transform(y) - yLo) / (yHi - yLo || 1)) * plotH;
  const syRaw = (t) => margin.top + plotH - ((t - yLo) / (yHi - yLo || 1)) * plotH;

  const grid = el("g", { class: "grid" });
  const labels = options.logY ? tickLabels(yTicks.map((t) => Math.pow(10, t)), "exp") : tickLabels(yTicks, options.yFormat);
  yTicks.forEach((t, i) => {
    const y = syRaw(t);
    grid.appendChild(el("line", { x1: margin.left, x2: margin.left + plotW, y1: y, y2: y }));
    grid.appendChild(el("text", { x: margin.left - 6, y: y + 4, "text-anchor": "end", class: "tick" }, labels[i]));
  });
  // One tick per epoch, thinned to about ten labels.
  const span = xMax - xMin;
  const every = Math.max(1, Math.ceil(span / 10));
  for (let x = Math.ceil(xMin); x <= xMax; x += every) {
    const px = sx(x);
    grid.appendChild(el("line", { x1: px, x2: px, y1: margin.top + plotH, y2: margin.top + plotH + 4 }));
    grid.appendChild(el("text", { x: px, y: margin.top + plotH + 16, "text-anchor": "middle", class: "tick" },
      String(x)));
  }
  svg.appendChild(grid);
  svg.appendChild(el("rect", { x: margin.left, y: margin.top, width: plotW, height: plotH, class: "frame" }));
  svg.appendChild(el("text", { x: margin.left + plotW / 2, y: height - 6, "text-anchor": "middle", class: "axis-label" },
    options.xLabel || "epoch"));

  series.forEach((s, index) => {
    const color = s.color || PALETTE[index % PALETTE.length];
    const group = el("g", { class: "series", "data-series": s.name });
    if (s.points.length > 1) {
      const d = s.points.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
      group.appendChild(el("path", {
        d, fill: "none", stroke: color, "stroke-width": 2, "stroke-dasharray": s.dashed ? "6 4" : undefined,
      }));
    }
    for (const [x, y] of s.points) {
      const dot = el("circle", {
        cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 3, fill: color, class: "point",
        "data-series": s.name, "data-x": x,
      });
      dot.appendChild(el("title", {}, `${s.name} · epoch ${x}: ${formatValue(y, options.yFormat)}`));
      group.appendChild(dot);
    }
    svg.appendChild(group);
  });

  // Legend, top right.
  let lx = width - margin.right;
  [...series].reverse().forEach((s, i) => {
    const color = s.color || PALETTE[(series.length - 1 - i) % PALETTE.length];
    const text = el("text", { x: lx, y: 18, "text-anchor": "end", class: "legend" }, s.name);
    svg.appendChild(text);
    const approx = s.name.length * 6.3 + 8;
    svg.appendChild(el("line", {
      x1: lx - approx - 16, x2: lx - approx - 2, y1: 14, y2: 14, stroke: color, "stroke-width": 3,
      "stroke-dasharray": s.dashed ? "4 3" : undefined,
    }));
    lx -= approx + 28;
  });
  return svg;
}

export function formatValue(value, format) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  if (format === "percent") return `${(value * 100).toFixed(2)}%`;
  if (format === "exp") return value.toExponential(2);
  return Number(value.toPrecision(4)).toString();
}

/**
 * Horizontal bars, largest first: [{label, value}] with values in [0, 1] (probabilities).
 * Each bar is a <rect class="bar" data-label="...">.
 */
export function barChart(items, options = {}) {
  const rowH = 24;
  const width = options.width || 520;
  const labelW = 110;
  const valueW = 70;
  const height = items.length * rowH + 10;
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart bars", role: "img",
    "aria-label": options.title || "bar chart", id: options.id });
  const barMax = width - labelW - valueW;
  items.forEach((item, i) => {
    const y = 5 + i * rowH;
    svg.appendChild(el("text", { x: labelW - 8, y: y + 16, "text-anchor": "end", class: "bar-label" }, item.label));
    svg.appendChild(el("rect", { x: labelW, y: y + 3, width: barMax, height: rowH - 8, class: "bar-track" }));
    const bar = el("rect", {
      x: labelW, y: y + 3, width: Math.max(1, item.value * barMax).toFixed(1), height: rowH - 8,
      class: i === 0 ? "bar top" : "bar", "data-label": item.label, "data-value": item.value,
    });
    bar.appendChild(el("title", {}, `${item.label}: ${(item.value * 100).toFixed(2)}%`));
    svg.appendChild(bar);
    svg.appendChild(el("text", { x: width - 4, y: y + 16, "text-anchor": "end", class: "bar-value" },
      `${(item.value * 100).toFixed(1)}%`));
  });
  return svg;
}
