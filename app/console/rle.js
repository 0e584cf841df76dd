// COCO compressed RLE (pycocotools maskApi.c rleFrString / rleDecode).

/** The run lengths of a compressed COCO counts string. */
export function parseCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p++;
      k++;
      if (!more && c & 0x10) x |= -1 << (5 * k); // sign bit on the last char
    }
    if (counts.length > 2) x += counts[counts.length - 2]; // deltas from index 3 on
    counts.push(x);
  }
  return counts;
}

/**
 * Decode `{size: [h, w], counts}` (compressed string or an array of runs) into
 * `{height, width, data}`, data a row-major Uint8Array (1 inside). Runs go down
 * the columns (Fortran order) and alternate 0s and 1s, starting with 0s.
 */
export function decodeRle(rle) {
  const [height, width] = rle.size;
  const runs = typeof rle.counts === "string" ? parseCounts(rle.counts) : rle.counts;
  const data = new Uint8Array(height * width);
  const total = height * width;
  let pos = 0; // column-major index
  for (let i = 0; i < runs.length && pos < total; i++) {
    const end = Math.min(pos + runs[i], total);
    if (i % 2 === 1) {
      for (let j = pos; j < end; j++) {
        const x = (j / height) | 0;
        data[(j - x * height) * width + x] = 1;
      }
    }
    pos = end;
  }
  return { height, width, data };
}
