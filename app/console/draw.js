// Drawing detections on a canvas: masks (RLE), boxes, label tags, colours per class.

import { decodeRle } from "./rle.js";

const PALETTE = [
  [230, 57, 70], [42, 157, 143], [69, 123, 157], [244, 162, 97], [131, 56, 236],
  [255, 190, 11], [58, 134, 255], [251, 86, 7], [6, 214, 160], [255, 0, 110],
  [141, 153, 174], [128, 185, 24],
];

/** The colour of a class, [r, g, b]: by class id, so each class keeps one colour. */
export function classColor(det) {
  const id = Number.isInteger(det.class_id) ? det.class_id : hash(det.class_name || "");
  return PALETTE[Math.abs(id) % PALETTE.length];
}

function hash(text) {
  let h = 0;
  for (const ch of text) h = (h * 31 + ch.charCodeAt(0)) | 0;
  return h;
}

const rgb = ([r, g, b], a = 1) => `rgba(${r}, ${g}, ${b}, ${a})`;

/** A small square in a detection's class colour (for tables and the class filter). */
export function swatch(det) {
  const node = document.createElement("span");
  node.className = "swatch";
  node.style.background = rgb(classColor(det)); // CSSOM, which the CSP allows
  return node;
}

/** Keep the detections scoring at least `min`. */
export const withScoreAtLeast = (detections, min) => detections.filter((d) => d.score >= min);

/** A canvas's text alternative: how many detections of which classes ("3 detections: 2 cat, 1 dog"). */
function describe(detections) {
  const byClass = new Map();
  for (const d of detections) byClass.set(d.class_name, (byClass.get(d.class_name) ?? 0) + 1);
  const parts = [...byClass].map(([name, n]) => `${n} ${name}`);
  const count = `${detections.length} detection${detections.length === 1 ? "" : "s"}`;
  return `${count}${parts.length ? `: ${parts.join(", ")}` : ""}`;
}

// Decoded masks, per detection object: the row-major data, its area, its bounds
// and (lazily) a small canvas of the mask in its class colour.
const masks = new WeakMap();

/** `{data, width, height, area, x0, y0, x1, y1}` of a detection's RLE mask, or null. */
export function maskOf(det) {
  if (!det.mask || Array.isArray(det.mask) || !det.mask.counts) return null;
  let m = masks.get(det);
  if (!m) {
    const { data, width, height } = decodeRle(det.mask);
    let area = 0, x0 = width, y0 = height, x1 = -1, y1 = -1;
    for (let y = 0, i = 0; y < height; y++) {
      for (let x = 0; x < width; x++, i++) {
        if (data[i]) {
          area++;
          if (x < x0) x0 = x;
          if (x > x1) x1 = x;
          if (y < y0) y0 = y;
          if (y > y1) y1 = y;
        }
      }
    }
    m = { data, width, height, area, x0, y0, x1, y1, canvas: null };
    masks.set(det, m);
  }
  return m;
}

/** The mask's pixels in the class colour, cropped to its bounds. */
function maskCanvas(det, m) {
  if (!m.canvas) {
    const w = m.x1 - m.x0 + 1, h = m.y1 - m.y0 + 1;
    const c = document.createElement("canvas");
    c.width = w;
    c.height = h;
    const ctx = c.getContext("2d");
    const img = ctx.createImageData(w, h);
    const [r, g, b] = classColor(det);
    for (let y = 0; y < h; y++) {
      let src = (y + m.y0) * m.width + m.x0;
      let dst = y * w * 4;
      for (let x = 0; x < w; x++, src++, dst += 4) {
        if (m.data[src]) {
          img.data[dst] = r;
          img.data[dst + 1] = g;
          img.data[dst + 2] = b;
          img.data[dst + 3] = 255;
        }
      }
    }
    ctx.putImageData(img, 0, 0);
    m.canvas = c;
  }
  return m.canvas;
}

/** Pixels inside a detection's mask (null without a mask). */
export function maskArea(det) {
  const m = maskOf(det);
  return m ? m.area : null;
}

/**
 * Draw `image` (an HTMLImageElement, or null: a grey background of `size`, e.g. an
 * image result's {width, height}) at its natural size, then each of `detections`. `highlight` is one of them or null:
 * it gets a thicker outline and the others are dimmed.
 */
export function drawDetections(canvas, image, detections, { size, highlight = null, maxVh = 75 } = {}) {
  const width = image ? image.naturalWidth : size.width;
  const height = image ? image.naturalHeight : size.height;
  if (canvas.width !== width) canvas.width = width;
  if (canvas.height !== height) canvas.height = height;
  // CSS: as wide as the column allows, but never taller than most of the window
  canvas.style.width = `min(100%, ${((maxVh * width) / height).toFixed(2)}vh)`;
  const ctx = canvas.getContext("2d");
  ctx.globalAlpha = 1;
  if (image) {
    ctx.drawImage(image, 0, 0);
  } else {
    ctx.fillStyle = "#d9dde3";
    ctx.fillRect(0, 0, width, height);
  }
  // strokes and labels scale with the image, as if it were shown ~800 px wide
  const unit = Math.max(0.5, Math.max(width, height) / 800);
  const font = Math.round(Math.max(6, 13 * unit));
  ctx.font = `600 ${font}px system-ui, sans-serif`;
  ctx.textBaseline = "top";

  for (const det of detections) {
    const m = maskOf(det);
    if (!m || m.area === 0) continue;
    ctx.globalAlpha = highlight === null ? 0.5 : det === highlight ? 0.6 : 0.15;
    ctx.drawImage(maskCanvas(det, m), m.x0, m.y0);
  }
  for (const det of detections) {
    const dim = highlight !== null && det !== highlight;
    const color = classColor(det);
    const [x1, y1, x2, y2] = det.box;
    ctx.globalAlpha = dim ? 0.35 : 1;
    ctx.strokeStyle = rgb(color);
    ctx.lineWidth = (det === highlight ? 3.5 : 1.5) * unit;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    // label tag: "name 0.93", above the box when there is room, else inside
    const text = `${det.class_name} ${det.score.toFixed(2)}`;
    const pad = Math.round(2 * unit);
    const tw = ctx.measureText(text).width + 2 * pad;
    const th = font + 2 * pad;
    const ty = y1 - th >= 0 ? y1 - th : y1;
    const tx = Math.min(Math.max(0, x1), Math.max(0, width - tw));
    ctx.fillStyle = rgb(color, 0.9);
    ctx.fillRect(tx, ty, tw, th);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, tx + pad, ty + pad);
  }
  ctx.globalAlpha = 1;
  canvas.dataset.drawn = String(detections.length);
  const label = canvas.dataset.label; // e.g. which side of the compare page
  canvas.setAttribute("aria-label", label ? `${label}: ${describe(detections)}` : `Image with ${describe(detections)}`);
}

/** The detection under canvas pixel (x, y): the smallest mask holding it, else the smallest box. */
export function detectionAt(detections, x, y) {
  let best = null;
  let bestArea = Infinity;
  const xi = Math.floor(x), yi = Math.floor(y);
  for (const det of detections) {
    const m = maskOf(det);
    if (m && xi >= 0 && yi >= 0 && xi < m.width && yi < m.height && m.data[yi * m.width + xi]) {
      if (m.area < bestArea) [best, bestArea] = [det, m.area];
    }
  }
  if (best) return best;
  for (const det of detections) {
    const [x1, y1, x2, y2] = det.box;
    const area = (x2 - x1) * (y2 - y1);
    if (x >= x1 && x <= x2 && y >= y1 && y <= y2 && area < bestArea) [best, bestArea] = [det, area];
  }
  return best;
}

/** Canvas pixel coordinates of a mouse event (the canvas may be scaled by CSS). */
export function canvasPoint(canvas, event) {
  const r = canvas.getBoundingClientRect();
  return {
    x: ((event.clientX - r.left) / r.width) * canvas.width,
    y: ((event.clientY - r.top) / r.height) * canvas.height,
  };
}

/** Load an image Blob/File as an HTMLImageElement (object URL). */
export function loadImage(blob) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    const url = URL.createObjectURL(blob);
    img.onload = () => resolve(img);
    img.onerror = () => {
      URL.revokeObjectURL(url);
      reject(new Error(`${blob.name || "the image"} could not be read by the browser`));
    };
    img.src = url;
  });
}

/** Format a box [x1, y1, x2, y2] for display. */
export const formatBox = (box) => box.map((v) => Math.round(v)).join(", ");

/** Format a response's timing_ms. */
export function formatTiming(t) {
  if (!t) return "";
  // no-break spaces inside each stage: a narrow column wraps only between stages
  const stage = (name, v) => `${name}\u00a0${Number(v).toFixed(1)}\u00a0ms`;
  const stages = ["queue", "inference", "postprocess", "total"].map((name) => stage(name, t[name]));
  return stages.join(" · ");
}
