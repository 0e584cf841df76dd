// A small canvas line chart: several series of [x, y] points, axes, ticks, legend.

const AXIS = "#98a2b3";
const GRID = "#eef0f3";
const TEXT = "#667085";

export class LineChart {
  /** series: [{label, color}], options: {yMin, yMax} (bounds to include, optional). */
  constructor(canvas, series, options = {}) {
    this.canvas = canvas;
    this.series = series.map((s) => ({ ...s, points: [] }));
    this.options = options;
    this.draw();
  }

  clear() {
    for (const s of this.series) s.points = [];
    this.draw();
  }

  /** Add a point to series `i`; a point at an x already there replaces it. */
  add(i, x, y) {
    if (typeof y !== "number" || !Number.isFinite(y)) return;
    const points = this.series[i].points;
    const at = points.findIndex((p) => p[0] === x);
    if (at >= 0) points[at] = [x, y];
    else {
      points.push([x, y]);
      points.sort((a, b) => a[0] - b[0]);
    }
  }

  count(i = 0) {
    return this.series[i].points.length;
  }

  draw() {
    const canvas = this.canvas;
    // draw at the device's pixel density, at the size CSS gives the canvas
    const ratio = window.devicePixelRatio || 1;
    const cssW = canvas.clientWidth || canvas.width;
    const cssH = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(cssW * ratio)) canvas.width = Math.round(cssW * ratio);
    if (canvas.height !== Math.round(cssH * ratio)) canvas.height = Math.round(cssH * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    ctx.font = "11px system-ui, sans-serif";

    const all = this.series.flatMap((s) => s.points);
    const pad = { left: 46, right: 12, top: 22, bottom: 26 };
    const w = cssW - pad.left - pad.right;
    const h = cssH - pad.top - pad.bottom;
    if (w <= 0 || h <= 0) return;
    if (!all.length) {
      ctx.fillStyle = TEXT;
      ctx.textAlign = "center";
      ctx.fillText("no data yet", cssW / 2, cssH / 2);
      ctx.textAlign = "left";
      return;
    }
    let [x0, x1] = extent(all.map((p) => p[0]));
    let [y0, y1] = extent(all.map((p) => p[1]));
    if (this.options.yMin !== undefined) y0 = Math.min(y0, this.options.yMin);
    if (this.options.yMax !== undefined) y1 = Math.max(y1, this.options.yMax);
    if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
    if (y0 === y1) [y0, y1] = [y0 - Math.abs(y0 || 1) * 0.1, y1 + Math.abs(y1 || 1) * 0.1];
    const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * w;
    const sy = (y) => pad.top + h - ((y - y0) / (y1 - y0)) * h;

    // grid and ticks
    ctx.strokeStyle = GRID;
    ctx.fillStyle = TEXT;
    ctx.lineWidth = 1;
    for (const y of ticks(y0, y1, 4)) {
      ctx.beginPath();
      ctx.moveTo(pad.left, sy(y));
      ctx.lineTo(pad.left + w, sy(y));
      ctx.stroke();
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      ctx.fillText(formatTick(y), pad.left - 6, sy(y));
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const integerX = all.every((p) => Number.isInteger(p[0])); // steps, epochs
    for (const x of ticks(x0, x1, 5).filter((x) => Number.isInteger(x) || !integerX)) {
      ctx.fillText(formatTick(x), sx(x), pad.top + h + 6);
    }
    ctx.strokeStyle = AXIS;
    ctx.beginPath();
    ctx.moveTo(pad.left, pad.top);
    ctx.lineTo(pad.left, pad.top + h);
    ctx.lineTo(pad.left + w, pad.top + h);
    ctx.stroke();

    // series: lines, and dots when there are few points
    for (const s of this.series) {
      if (!s.points.length) continue;
      ctx.strokeStyle = s.color;
      ctx.fillStyle = s.color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      s.points.forEach(([x, y], i) => (i ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
      ctx.stroke();
      if (s.points.length <= 30) {
        for (const [x, y] of s.points) {
          ctx.beginPath();
          ctx.arc(sx(x), sy(y), 3, 0, 2 * Math.PI);
          ctx.fill();
        }
      }
    }

    // legend
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    let lx = pad.left;
    for (const s of this.series) {
      ctx.fillStyle = s.color;
      ctx.fillRect(lx, 7, 10, 10);
      ctx.fillStyle = TEXT;
      const last = s.points.at(-1);
      const text = last ? `${s.label} ${formatTick(last[1])}` : s.label;
      ctx.fillText(text, lx + 14, 12);
      lx += ctx.measureText(text).width + 30;
    }
  }
}

function extent(values) {
  return [Math.min(...values), Math.max(...values)];
}

/** About `n` round tick values between a and b. */
function ticks(a, b, n) {
  const step0 = (b - a) / n;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) ?? 10 * mag;
  const out = [];
  for (let v = Math.ceil(a / step) * step; v <= b + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function formatTick(v) {
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 1 ? v.toFixed(2) : v.toFixed(3);
}
