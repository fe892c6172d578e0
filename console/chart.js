// A small SVG line chart: one series of (x, y) points with labelled axes. Drawing only.

const NS = "http://www.w3.org/2000/svg";
const W = 560, H = 220, PAD = { left: 56, right: 16, top: 16, bottom: 36 };

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

const tick = (v) => (Math.abs(v) >= 1000 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(3));

export function lineChart({ title, xLabel, yLabel, points, cls }) {
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: `chart ${cls || ""}` });
  svg.append(el("title", {}, title));
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
    svg.append(el("text", { x: PAD.left - 6, y: sy(y) + 4, "text-anchor": "end", class: "tick" }, tick(y)));
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
  svg.dataset.points = String(points.length);
  return svg;
}
