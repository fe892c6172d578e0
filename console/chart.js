// A small SVG line chart: one series of (x, y) points with labelled axes. Drawing only.

const NS = "http://www.w3.org/2000/svg";
const W = 560, H = 240, PAD = { left: 64, right: 16, top: 34, bottom: 36 };
const HOVER_POINTS = 200; // points that show their value on hover (evenly chosen past that)

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// A tick's digits follow the data's range: a healing loss near 2e-5 reads 2.13e-5, not 0.000.
function tick(v, span, top) {
  if (top < 0.01) return v === 0 ? "0" : v.toExponential(2);
  if (Math.abs(v) >= 1000) return v.toFixed(0);
  const digits = span > 0 ? Math.min(4, Math.max(0, Math.ceil(-Math.log10(span)) + 1)) : 3;
  return v.toFixed(Math.max(digits, Math.abs(v) >= 10 ? 1 : 2));
}

const value = (v) => (Math.abs(v) < 0.01 && v !== 0 ? v.toExponential(3) : Number(v.toPrecision(5)).toString());

export function lineChart({ title, xLabel, yLabel, points, cls }) {
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: `chart ${cls || ""}` });
  svg.append(el("title", {}, title));
  svg.append(el("text", { x: PAD.left, y: 20, class: "chart-title" }, title));
  const plotW = W - PAD.left - PAD.right, plotH = H - PAD.top - PAD.bottom;
  svg.append(el("rect", { x: PAD.left, y: PAD.top, width: plotW, height: plotH, class: "plot" }));
  if (!points.length) {
    svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "No points yet"));
    return svg;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * plotW;
  const sy = (y) => PAD.top + (1 - (y - y0) / (y1 - y0)) * plotH;
  for (const f of [0, 0.5, 1]) {
    const y = y0 + f * (y1 - y0);
    svg.append(el("line", { x1: PAD.left, x2: PAD.left + plotW, y1: sy(y), y2: sy(y), class: "grid" }));
    svg.append(el("text", { x: PAD.left - 6, y: sy(y) + 4, "text-anchor": "end", class: "tick" },
      tick(y, y1 - y0, Math.max(Math.abs(y0), Math.abs(y1)))));
  }
  for (const f of [0, 0.5, 1]) {
    const x = x0 + f * (x1 - x0);
    svg.append(el("text", { x: sx(x), y: PAD.top + plotH + 16, "text-anchor": "middle", class: "tick" }, Math.round(x)));
  }
  svg.append(el("text", { x: PAD.left + plotW / 2, y: H - 4, "text-anchor": "middle", class: "axis" }, xLabel));
  svg.append(el("text", { x: 12, y: PAD.top + plotH / 2, "text-anchor": "middle", class: "axis",
    transform: `rotate(-90 12 ${PAD.top + plotH / 2})` }, yLabel));
  svg.append(el("polyline", { points: points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "), class: "line" }));
  for (const p of points.length <= 40 ? points : [points[points.length - 1]]) {
    svg.append(el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, class: "dot" }));
  }
  const every = Math.max(1, Math.ceil(points.length / HOVER_POINTS));
  for (const [i, p] of points.entries()) {  // wide transparent targets: hovering one shows its value
    if (i % every && i !== points.length - 1) continue;
    const target = el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 7, class: "hover" });
    target.append(el("title", {}, `${xLabel} ${Math.round(p[0])}: ${yLabel} ${value(p[1])}`));
    svg.append(target);
  }
  svg.dataset.points = String(points.length);
  return svg;
}
