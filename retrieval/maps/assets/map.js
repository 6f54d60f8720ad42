/* retrieve map: the page script. Reads the JSON data block and the JPEG atlas blocks of this file,
   draws every point on a 2-D canvas (dots when zoomed out, thumbnails when zoomed in), and never
   turns data into markup: every path and label reaches the page through textContent. */
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const D = JSON.parse($("map-data").textContent);

  function decode(b64, Type) {
    const bin = atob(b64);
    const u8 = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
    return new Type(u8.buffer);
  }

  // ---- data -------------------------------------------------------------------------------
  const N = D.shown;
  const K = D.k;
  const xy = decode(D.xy, Float32Array);
  const labelOf = decode(D.labels, Uint32Array);
  const groupOf = decode(D.groups, Uint32Array);
  const idOf = decode(D.ids, Int32Array);
  const nbr = decode(D.neighbours, Int32Array);
  const nbrDist = decode(D.distances, Float32Array);
  const paths = D.paths;
  const TS = D.thumb.size;
  const COLS = D.thumb.cols;
  const PER_ATLAS = COLS * COLS;
  const G = D.groupNames.length;
  const hidden = new Uint8Array(G);
  const groupCount = new Uint32Array(G);
  for (let i = 0; i < N; i++) groupCount[groupOf[i]]++;

  // Draw order: a seeded shuffle, so no class is always on top and a thumbnail budget is a fair sample.
  const order = new Uint32Array(N);
  for (let i = 0; i < N; i++) order[i] = i;
  let seed = 0x9e3779b9;
  const rand = () => {
    seed ^= seed << 13; seed ^= seed >>> 17; seed ^= seed << 5;
    return (seed >>> 0) / 4294967296;
  };
  for (let i = N - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    const t = order[i]; order[i] = order[j]; order[j] = t;
  }

  // Bounding box of the data (coordinates arrive normalised to [0, 1] with the aspect kept).
  let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
  for (let i = 0; i < N; i++) {
    const x = xy[2 * i], y = xy[2 * i + 1];
    if (x < minX) minX = x; if (x > maxX) maxX = x;
    if (y < minY) minY = y; if (y > maxY) maxY = y;
  }
  if (!(maxX >= minX)) { minX = minY = 0; maxX = maxY = 1; }

  // ---- colours ----------------------------------------------------------------------------
  const BASE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#e7969c", "#637939", "#ad494a", "#7b4173", "#3182bd", "#e6550d",
    "#31a354", "#756bb1", "#636363"];
  function hsl(h, s, l) {
    const f = (n) => {
      const k = (n + h / 30) % 12, a = s * Math.min(l, 1 - l);
      return Math.round(255 * (l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
    };
    return [f(0), f(8), f(4)];
  }
  const rgb = [];
  for (let g = 0; g < G; g++) {
    if (G === 1) rgb.push([70, 110, 170]);
    else if (g < BASE.length) { const h = BASE[g]; rgb.push([1, 3, 5].map((o) => parseInt(h.slice(o, o + 2), 16))); }
    else rgb.push(hsl((g * 137.508) % 360, [0.85, 0.55][g % 2], [0.42, 0.58, 0.32][Math.floor(g / 2) % 3]));
  }
  const css = rgb.map(([r, g, b]) => `rgb(${r},${g},${b})`);
  const packed = new Uint32Array(G); // ImageData pixels are RGBA bytes: little-endian ABGR words
  const packedDim = new Uint32Array(G);
  for (let g = 0; g < G; g++) {
    const [r, gg, b] = rgb[g];
    packed[g] = (255 << 24 | b << 16 | gg << 8 | r) >>> 0;
    packedDim[g] = (50 << 24 | b << 16 | gg << 8 | r) >>> 0;
  }
  const HIT = (255 << 24 | 0 << 16 | 136 << 8 | 255) >>> 0;
  const SEL = (255 << 24 | 203 << 16 | 107 << 8 | 11) >>> 0;

  // ---- canvas and view ----------------------------------------------------------------------
  const canvas = $("map");
  const ctx = canvas.getContext("2d");
  let W = 1, H = 1, dpr = 1, image = null, pixels = null;
  let cx = 0.5, cy = 0.5, scale = 1; // world centre and device pixels per world unit
  let sizeExp = 0;
  const baseWorld = Math.min(0.08, Math.max(0.002, 0.9 / Math.sqrt(Math.max(N, 1))));
  const thumbPx = () => baseWorld * Math.pow(2, sizeExp) * scale;
  const frameWidth = (s) => Math.max(Math.round(3 * dpr), Math.round(s * 0.1));
  // Thumbnails per frame; the rest stay dots. A thumbnail costs ~7 us in software-rasterised
  // headless Chromium and 100k dots ~9 ms, so 2500 keeps a frame near 25 ms (bench/map.py).
  const BUDGET = 2500;

  function resize() {
    const r = canvas.getBoundingClientRect();
    dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(r.width * dpr)), h = Math.max(1, Math.round(r.height * dpr));
    const first = W === 1 && H === 1;
    if (w === W && h === H && image) return;
    W = w; H = h;
    canvas.width = W; canvas.height = H;
    image = ctx.createImageData(W, H);
    pixels = new Uint32Array(image.data.buffer);
    if (first) fit(); else schedule();
  }

  function fit(sel) {
    let x0 = minX, x1 = maxX, y0 = minY, y1 = maxY;
    if (sel && sel.length) {
      x0 = y0 = Infinity; x1 = y1 = -Infinity;
      for (const i of sel) {
        const x = xy[2 * i], y = xy[2 * i + 1];
        x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
      }
    }
    const pad = baseWorld * Math.pow(2, sizeExp);
    const sw = Math.max(x1 - x0 + 2 * pad, 1e-3), sh = Math.max(y1 - y0 + 2 * pad, 1e-3);
    scale = 0.96 * Math.min(W / sw, H / sh);
    cx = (x0 + x1) / 2; cy = (y0 + y1) / 2;
    schedule();
  }
  const toScreenX = (i) => (xy[2 * i] - cx) * scale + W / 2;
  const toScreenY = (i) => (xy[2 * i + 1] - cy) * scale + H / 2;

  function zoomAt(px, py, factor) {
    const wx = (px - W / 2) / scale + cx, wy = (py - H / 2) / scale + cy;
    scale = Math.min(Math.max(scale * factor, 10), 1e7);
    cx = wx - (px - W / 2) / scale; cy = wy - (py - H / 2) / scale;
    schedule();
  }

  // ---- atlases ------------------------------------------------------------------------------
  const atlasBlocks = Array.from(document.querySelectorAll("script.atlas"));
  const atlases = new Array(atlasBlocks.length).fill(null);
  let atlasesLoaded = 0;
  async function loadAtlases() {
    for (let a = 0; a < atlasBlocks.length; a++) {
      try {
        const bytes = decode(atlasBlocks[a].textContent, Uint8Array);
        atlases[a] = await createImageBitmap(new Blob([bytes], { type: "image/jpeg" }));
      } catch (e) {
        atlases[a] = null; // a broken atlas leaves its points as dots
      }
      atlasesLoaded++;
      setStatus();
      schedule();
    }
  }
  function tile(i) {
    const a = Math.floor(i / PER_ATLAS), j = i % PER_ATLAS;
    return [atlases[a], (j % COLS) * TS, Math.floor(j / COLS) * TS];
  }
  function drawThumb(c2, i, x, y, s) {
    const [img, sx, sy] = tile(i);
    if (!img) return false;
    c2.drawImage(img, sx, sy, TS, TS, x, y, s, s);
    return true;
  }

  // ---- marks: search hits, selection, focus and its neighbours -------------------------------
  let hits = null; // Uint8Array(N) or null when no search is active
  let hitList = [];
  let selection = [];
  const selected = new Uint8Array(N);
  let focus = -1;

  // ---- rendering ----------------------------------------------------------------------------
  const stats = { drawn: 0, thumbs: 0, frames: 0, firstPaintMs: null, lastMs: 0, phases: [0, 0, 0] };
  const frameTimes = [];
  const cand = new Uint32Array(BUDGET);
  let pending = false;
  function schedule() {
    if (!pending) { pending = true; requestAnimationFrame(render); }
  }
  let lasso = null;

  function render() {
    pending = false;
    if (!image) return;
    const t0 = performance.now();
    const s = thumbPx();
    const half = s / 2;
    const useThumbs = s >= 10 && atlasesLoaded > 0;
    const dot = Math.max(1, Math.min(5, Math.round(s * 0.7)));
    const dh = dot >> 1;
    pixels.fill(0);
    let drawn = 0, nc = 0;
    const hx = W / 2 - cx * scale, hy = H / 2 - cy * scale;
    for (let o = 0; o < N; o++) {
      const i = order[o];
      const g = groupOf[i];
      if (hidden[g]) continue;
      const x = xy[2 * i] * scale + hx, y = xy[2 * i + 1] * scale + hy;
      if (x < -half || y < -half || x >= W + half || y >= H + half) continue;
      drawn++;
      if (useThumbs && nc < BUDGET) { cand[nc++] = i; continue; }
      const x0 = Math.max(0, Math.round(x) - dh), y0 = Math.max(0, Math.round(y) - dh);
      const x1 = Math.min(W, Math.round(x) - dh + dot), y1 = Math.min(H, Math.round(y) - dh + dot);
      const c = hits && !hits[i] ? packedDim[g] : packed[g];
      for (let yy = y0; yy < y1; yy++) {
        const row = yy * W;
        for (let xx = x0; xx < x1; xx++) pixels[row + xx] = c;
      }
    }
    // Marked points on top as larger dots: search hits in orange, the selection in blue.
    const big = dot + 2, bh = big >> 1;
    const mark = (i, c) => {
      if (hidden[groupOf[i]]) return;
      const x = Math.round(toScreenX(i)), y = Math.round(toScreenY(i));
      for (let yy = Math.max(0, y - bh); yy < Math.min(H, y - bh + big); yy++)
        for (let xx = Math.max(0, x - bh); xx < Math.min(W, x - bh + big); xx++) pixels[yy * W + xx] = c;
    };
    if (!useThumbs) {
      if (hitList.length < 200000) for (const i of hitList) mark(i, HIT);
      for (const i of selection) mark(i, SEL);
    }
    // Class-coloured frames of the thumbnails go into the pixel buffer too: a fillStyle change and a
    // fillRect per thumbnail cost about as much as the image itself. The thumbnail drawn on top
    // covers the inside of its frame; overlapping neighbours may cover the rest.
    // The class must be visible at every zoom: at least 3 device pixels of frame (1 px was lost
    // against the thumbnail at the default zoom, so the legend matched nothing visible).
    const border = useThumbs ? frameWidth(s) : 0;
    if (border) {
      const span = Math.round(s) + 2 * border;
      for (let c = 0; c < nc; c++) {
        const i = cand[c];
        const col = hits && !hits[i] ? packedDim[groupOf[i]] : packed[groupOf[i]];
        const bx = Math.round(toScreenX(i) - half) - border, by = Math.round(toScreenY(i) - half) - border;
        const x0 = Math.max(0, bx), x1 = Math.min(W, bx + span), y0 = Math.max(0, by), y1 = Math.min(H, by + span);
        for (let yy = y0; yy < y1; yy++) {
          const row = yy * W;
          if (yy < by + border || yy >= by + span - border) {
            for (let xx = x0; xx < x1; xx++) pixels[row + xx] = col;
          } else {
            for (let xx = x0; xx < Math.min(x1, bx + border); xx++) pixels[row + xx] = col;
            for (let xx = Math.max(x0, bx + span - border); xx < x1; xx++) pixels[row + xx] = col;
          }
        }
      }
    }
    const t1 = performance.now();
    ctx.putImageData(image, 0, 0);
    const t2 = performance.now();
    let thumbs = 0;
    if (useThumbs) {
      let alpha = 1;
      for (let c = 0; c < nc; c++) {
        const i = cand[c];
        const x = Math.round(toScreenX(i) - half), y = Math.round(toScreenY(i) - half);
        const a = hits && !hits[i] ? 0.2 : 1;
        if (a !== alpha) { ctx.globalAlpha = a; alpha = a; }
        if (drawThumb(ctx, i, x, y, Math.round(s))) thumbs++;
        else { ctx.fillStyle = css[groupOf[i]]; ctx.fillRect(x, y, s, s); }
      }
      ctx.globalAlpha = 1;
      ctx.lineWidth = Math.max(2, 2 * dpr);
      if (hitList.length <= BUDGET) {
        ctx.strokeStyle = "#ff8800";
        for (const i of hitList) if (!hidden[groupOf[i]]) ctx.strokeRect(toScreenX(i) - half, toScreenY(i) - half, s, s);
      }
      ctx.strokeStyle = "#0b6bcb";
      if (selection.length <= BUDGET) for (const i of selection) ctx.strokeRect(toScreenX(i) - half, toScreenY(i) - half, s, s);
    }
    if (focus >= 0) {
      const fx = toScreenX(focus), fy = toScreenY(focus);
      ctx.lineWidth = Math.max(1, dpr);
      ctx.strokeStyle = "rgba(11,107,203,0.7)";
      ctx.beginPath();
      for (let r = 0; r < K; r++) {
        const j = nbr[focus * K + r];
        if (j >= 0 && j < N) { ctx.moveTo(fx, fy); ctx.lineTo(toScreenX(j), toScreenY(j)); }
      }
      ctx.stroke();
      const r0 = Math.max(half, 5 * dpr) + 2 * dpr;
      ctx.lineWidth = 2 * dpr;
      for (let r = 0; r < K; r++) {
        const j = nbr[focus * K + r];
        if (j >= 0 && j < N) ctx.strokeRect(toScreenX(j) - r0, toScreenY(j) - r0, 2 * r0, 2 * r0);
      }
      ctx.strokeStyle = "#d62728";
      ctx.lineWidth = 3 * dpr;
      ctx.strokeRect(fx - r0, fy - r0, 2 * r0, 2 * r0);
    }
    if (lasso && lasso.length > 1) {
      ctx.strokeStyle = "#0b6bcb"; ctx.fillStyle = "rgba(11,107,203,0.08)"; ctx.lineWidth = 1.5 * dpr;
      ctx.beginPath(); ctx.moveTo(lasso[0], lasso[1]);
      for (let p = 2; p < lasso.length; p += 2) ctx.lineTo(lasso[p], lasso[p + 1]);
      ctx.closePath(); ctx.fill(); ctx.stroke();
    }
    stats.drawn = drawn; stats.thumbs = thumbs; stats.frames++;
    stats.phases = [t1 - t0, t2 - t1, performance.now() - t2]; // dots, putImageData, thumbnails and marks
    const ms = performance.now() - t0;
    stats.lastMs = ms;
    frameTimes.push(ms);
    if (frameTimes.length > 1000) frameTimes.shift();
    if (stats.firstPaintMs === null) stats.firstPaintMs = performance.now();
    setStatus();
  }

  // ---- picking: a uniform grid over the unit square ----------------------------------------
  const GS = Math.max(1, Math.min(1024, Math.ceil(Math.sqrt(N / 2))));
  const cellStart = new Uint32Array(GS * GS + 1);
  const cellItems = new Uint32Array(N);
  const cellOf = (v) => Math.min(GS - 1, Math.max(0, Math.floor(v * GS)));
  {
    for (let i = 0; i < N; i++) cellStart[cellOf(xy[2 * i + 1]) * GS + cellOf(xy[2 * i]) + 1]++;
    for (let c = 0; c < GS * GS; c++) cellStart[c + 1] += cellStart[c];
    const fill = cellStart.slice(0, GS * GS);
    for (let i = 0; i < N; i++) cellItems[fill[cellOf(xy[2 * i + 1]) * GS + cellOf(xy[2 * i])]++] = i;
  }
  function pick(px, py) {
    const s = thumbPx();
    const r = Math.max(s / 2, 6 * dpr) / scale; // world units
    const wx = (px - W / 2) / scale + cx, wy = (py - H / 2) / scale + cy;
    let best = -1, bestD = r * r;
    const c0 = cellOf(wx - r), c1 = cellOf(wx + r), r0 = cellOf(wy - r), r1 = cellOf(wy + r);
    for (let gy = r0; gy <= r1; gy++) {
      for (let gx = c0; gx <= c1; gx++) {
        const c = gy * GS + gx;
        for (let p = cellStart[c]; p < cellStart[c + 1]; p++) {
          const i = cellItems[p];
          if (hidden[groupOf[i]]) continue;
          const dx = xy[2 * i] - wx, dy = xy[2 * i + 1] - wy, d = dx * dx + dy * dy;
          if (d <= bestD) { bestD = d; best = i; }
        }
      }
    }
    return best;
  }

  // ---- header, legend, status ----------------------------------------------------------------
  const fmt = (n) => n.toLocaleString("en-US");
  $("title").textContent = D.title;
  $("count").textContent = N === D.total ? `${fmt(N)} images` : `${fmt(N)} of ${fmt(D.total)} shown`;
  $("count").title = N === D.total ? "every image in the index" : "a sample stratified by label (--max-points)";
  const info = D.info || {};
  const infoText = [info.method, info.backbone && `${info.backbone}${info.layer ? " " + info.layer : ""} ${info.dim}-d`,
    info.metric, info.variance, info.missing ? `${fmt(info.missing)} thumbnails unreadable` : ""].filter(Boolean).join(" · ");
  $("info").textContent = infoText;
  $("info").title = `${info.index || ""}\n${info.root || ""}\n${info.created || ""}`;
  function setStatus() {
    const loading = atlasesLoaded < atlasBlocks.length ? ` · thumbnails ${atlasesLoaded}/${atlasBlocks.length}` : "";
    $("status").textContent = `${fmt(stats.drawn)} drawn${loading}`;
  }

  const legend = $("legend");
  const legendItems = [];
  // Largest first; equal counts in the names' natural order (c2 before c10: the page's group ids
  // are in that order already).
  const byCount = Array.from({ length: G }, (_, g) => g).sort((a, b) => groupCount[b] - groupCount[a] || a - b);
  $("legend-title").textContent = info.colorBy === "folder" ? "Folders" : "Classes";
  for (const g of byCount) {
    const li = document.createElement("li");
    li.dataset.group = String(g);
    li.setAttribute("role", "button");
    li.setAttribute("aria-pressed", "true");
    li.tabIndex = 0;
    li.title = "show / hide (Enter or Space)";
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = css[g];
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = D.groupNames[g];
    const count = document.createElement("span");
    count.className = "muted";
    count.textContent = fmt(groupCount[g]);
    li.append(sw, name, count);
    li.addEventListener("click", () => setHidden(g, !hidden[g]));
    li.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); setHidden(g, !hidden[g]); }
    });
    legend.append(li);
    legendItems[g] = li;
  }
  function setHidden(g, v) {
    hidden[g] = v ? 1 : 0;
    legendItems[g].classList.toggle("off", !!v);
    legendItems[g].setAttribute("aria-pressed", v ? "false" : "true");
    schedule();
  }
  $("legend-all").addEventListener("click", () => { for (let g = 0; g < G; g++) setHidden(g, false); });
  $("legend-none").addEventListener("click", () => { for (let g = 0; g < G; g++) setHidden(g, true); });

  // ---- list entries (neighbours, matches) ------------------------------------------------------
  function entry(item, extra, onClick) {
    const li = document.createElement("li");
    const c = document.createElement("canvas");
    c.width = c.height = 40;
    if (item < N) {
      const cc = c.getContext("2d");
      const [img, sx, sy] = tile(item);
      if (img) cc.drawImage(img, sx, sy, TS, TS, 0, 0, 40, 40);
    }
    const text = document.createElement("div");
    const p = document.createElement("div");
    p.className = "path";
    p.textContent = paths[item];
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = extra;
    text.append(p, meta);
    li.append(c, text);
    li.title = `id ${idOf[item]}`;
    if (onClick) li.addEventListener("click", onClick);
    return li;
  }

  function centreOn(i) {
    cx = xy[2 * i]; cy = xy[2 * i + 1];
    const minScale = 24 / (baseWorld * Math.pow(2, sizeExp)); // thumbnails at least 24 px
    if (scale < minScale) scale = minScale;
    schedule();
  }

  function showNeighbours(i) {
    focus = i;
    const panel = $("neighbours-panel");
    const list = $("neighbours");
    list.replaceChildren();
    if (i < 0) { panel.hidden = true; schedule(); return; }
    panel.hidden = false;
    const among = N === D.total ? "" : `, nearest among the ${fmt(N)} shown`;
    const open = $("open-original");
    // Built with the URL API from the root's file URL (encoded by Python) and the relative path:
    // every character of the name is percent-encoded, none can become markup or script.
    try {
      open.href = originalUrl(i);
      open.hidden = false;
    } catch (err) { open.hidden = true; }
    $("neighbours-of").textContent = `of ${paths[i]} (${D.labelNames[labelOf[i]]}), in the ${info.dim || ""}-d feature space (${info.metric || "l2"})${among}:`;
    for (let r = 0; r < K; r++) {
      const j = nbr[i * K + r];
      if (j < 0) continue;
      const onMap = j < N;
      const meta = `${D.labelNames[labelOf[j]]} · ${nbrDist[i * K + r].toFixed(4)}${onMap ? "" : " · not in the sample"}`;
      const li = entry(j, meta, onMap ? () => { centreOn(j); showNeighbours(j); } : null);
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = String(r + 1);
      li.prepend(rank);
      list.append(li);
    }
    schedule();
  }

  // ---- preview --------------------------------------------------------------------------------
  const preview = $("preview");
  const pctx = $("preview-img").getContext("2d");
  let hovered = -1;
  let previewSource = "";
  const PREVIEW = 192;
  function originalUrl(i) {
    // The root's file URL comes encoded from Python; every part of the relative path is encoded here.
    return new URL(paths[i].split("/").map(encodeURIComponent).join("/"), info.rootUrl).href;
  }
  function showPreview(i, clientX, clientY) {
    if (i < 0) { preview.hidden = true; hovered = -1; return; }
    if (i !== hovered) {
      hovered = i;
      const cv = $("preview-img");
      if (cv.width !== PREVIEW) { cv.width = cv.height = PREVIEW; cv.style.width = cv.style.height = `${PREVIEW}px`; }
      pctx.clearRect(0, 0, PREVIEW, PREVIEW);
      pctx.imageSmoothingQuality = "high";
      // The thumbnail at most 2x at once (centred), then the original file itself, sharp, once it
      // has loaded from disk; a page moved away from its images keeps the thumbnail.
      const side = Math.min(PREVIEW, 2 * TS), off = (PREVIEW - side) / 2;
      const [img, sx, sy] = tile(i);
      if (img) pctx.drawImage(img, sx, sy, TS, TS, off, off, side, side);
      else { pctx.fillStyle = css[groupOf[i]]; pctx.fillRect(off, off, side, side); }
      previewSource = "thumbnail";
      const full = new Image();
      full.onload = () => {
        if (hovered !== i) return;
        const s = Math.min(full.naturalWidth, full.naturalHeight);
        pctx.clearRect(0, 0, PREVIEW, PREVIEW);
        // Centre square, as the thumbnails are cut.
        pctx.drawImage(full, (full.naturalWidth - s) / 2, (full.naturalHeight - s) / 2, s, s, 0, 0, PREVIEW, PREVIEW);
        previewSource = "original";
      };
      full.onerror = () => {};
      try { full.src = originalUrl(i); } catch (err) { /* no root URL: the thumbnail stays */ }
      $("preview-path").textContent = paths[i];
      $("preview-label").textContent = `${D.labelNames[labelOf[i]]} · id ${idOf[i]}`;
    }
    preview.hidden = false;
    const pw = preview.offsetWidth, ph = preview.offsetHeight;
    let left = clientX + 16, top = clientY + 16;
    if (left + pw > window.innerWidth) left = clientX - pw - 16;
    if (top + ph > window.innerHeight) top = Math.max(0, window.innerHeight - ph - 4);
    preview.style.left = `${Math.max(0, left)}px`;
    preview.style.top = `${top}px`;
  }

  // ---- search ----------------------------------------------------------------------------------
  let lower = null;
  let searchTimer = 0;
  function runSearch() {
    const q = $("search").value.trim().toLowerCase();
    const panel = $("search-panel");
    const list = $("search-results");
    list.replaceChildren();
    if (!q) { hits = null; hitList = []; $("search-count").textContent = ""; panel.hidden = true; schedule(); return; }
    if (!lower) lower = paths.slice(0, N).map((p) => p.toLowerCase());
    hits = new Uint8Array(N);
    hitList = [];
    for (let i = 0; i < N; i++) if (lower[i].includes(q)) { hits[i] = 1; hitList.push(i); }
    // No match: say so and leave the map as it was, instead of dimming every image.
    if (!hitList.length) hits = null;
    $("search-count").textContent = hitList.length ? `${fmt(hitList.length)} match${hitList.length === 1 ? "" : "es"}` : "no match";
    panel.hidden = hitList.length === 0;
    for (const i of hitList.slice(0, 100)) list.append(entry(i, D.labelNames[labelOf[i]], () => { centreOn(i); showNeighbours(i); }));
    schedule();
  }
  $("search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(runSearch, 120); });
  $("search").addEventListener("keydown", (e) => {
    if (e.key === "Enter") { clearTimeout(searchTimer); runSearch(); if (hitList.length) fit(hitList); }
  });

  // ---- selection ---------------------------------------------------------------------------------
  function setSelection(list) {
    for (const i of selection) selected[i] = 0;
    selection = list;
    for (const i of selection) selected[i] = 1;
    const panel = $("selection-panel");
    panel.hidden = selection.length === 0;
    $("selection-count").textContent = `${fmt(selection.length)} selected`;
    $("selection-paths").value = selection.map((i) => paths[i]).join("\n");
    schedule();
  }
  function finishLasso(poly) {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let p = 0; p < poly.length; p += 2) {
      x0 = Math.min(x0, poly[p]); x1 = Math.max(x1, poly[p]); y0 = Math.min(y0, poly[p + 1]); y1 = Math.max(y1, poly[p + 1]);
    }
    const out = [];
    const n = poly.length / 2;
    for (let i = 0; i < N; i++) {
      if (hidden[groupOf[i]]) continue;
      const x = toScreenX(i), y = toScreenY(i);
      if (x < x0 || x > x1 || y < y0 || y > y1) continue;
      let inside = false;
      for (let a = 0, b = n - 1; a < n; b = a++) {
        const ax = poly[2 * a], ay = poly[2 * a + 1], bx = poly[2 * b], by = poly[2 * b + 1];
        if ((ay > y) !== (by > y) && x < ((bx - ax) * (y - ay)) / (by - ay) + ax) inside = !inside;
      }
      if (inside) out.push(i);
    }
    setSelection(out);
  }
  $("clear-selection").addEventListener("click", () => setSelection([]));
  $("copy").addEventListener("click", async () => {
    const text = $("selection-paths").value;
    const btn = $("copy");
    try {
      await navigator.clipboard.writeText(text);
      btn.textContent = "Copied";
    } catch (e) {
      // file:// pages may lack the async clipboard; the selected textarea and execCommand still work.
      const ta = $("selection-paths");
      ta.focus(); ta.select();
      btn.textContent = document.execCommand("copy") ? "Copied" : "Press Ctrl+C";
    }
    setTimeout(() => { btn.textContent = "Copy paths"; }, 1500);
  });
  let lassoMode = false;
  $("lasso").addEventListener("click", () => {
    lassoMode = !lassoMode;
    $("lasso").setAttribute("aria-pressed", String(lassoMode));
    canvas.classList.toggle("lasso", lassoMode);
  });

  // ---- pointer, wheel, keys ----------------------------------------------------------------------
  let drag = null;
  const devXY = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * dpr, (e.clientY - r.top) * dpr];
  };
  canvas.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    canvas.setPointerCapture(e.pointerId);
    const [x, y] = devXY(e);
    if (e.shiftKey || lassoMode) { lasso = [x, y]; drag = null; return; }
    drag = { x, y, cx, cy, moved: false };
    canvas.style.cursor = "grabbing";
  });
  canvas.addEventListener("pointermove", (e) => {
    const [x, y] = devXY(e);
    if (lasso) {
      const n = lasso.length;
      if (Math.hypot(x - lasso[n - 2], y - lasso[n - 1]) > 2 * dpr) { lasso.push(x, y); schedule(); }
      return;
    }
    if (drag) {
      if (!drag.moved && Math.hypot(x - drag.x, y - drag.y) > 3 * dpr) drag.moved = true;
      if (drag.moved) {
        cx = drag.cx - (x - drag.x) / scale; cy = drag.cy - (y - drag.y) / scale;
        showPreview(-1);
        schedule();
        return;
      }
    }
    showPreview(pick(x, y), e.clientX, e.clientY);
  });
  canvas.addEventListener("pointerup", (e) => {
    const [x, y] = devXY(e);
    if (lasso) {
      const poly = lasso;
      lasso = null;
      if (poly.length >= 6) finishLasso(poly);
      schedule();
      return;
    }
    if (drag && !drag.moved) showNeighbours(pick(x, y));
    drag = null;
    canvas.style.cursor = "";
  });
  canvas.addEventListener("pointerleave", () => showPreview(-1));
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [x, y] = devXY(e);
    const unit = e.deltaMode === 1 ? 33 : e.deltaMode === 2 ? 400 : 1;
    zoomAt(x, y, Math.exp(-e.deltaY * unit * 0.0015));
    showPreview(-1);
  }, { passive: false });
  $("zoom-in").addEventListener("click", () => zoomAt(W / 2, H / 2, 1.5));
  $("zoom-out").addEventListener("click", () => zoomAt(W / 2, H / 2, 1 / 1.5));
  $("fit").addEventListener("click", () => fit());
  $("scale").addEventListener("input", (e) => { sizeExp = Number(e.target.value); schedule(); });
  document.addEventListener("keydown", (e) => {
    if (e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement) return;
    if (e.key === "f" || e.key === "F") fit();
    else if (e.key === "+" || e.key === "=") zoomAt(W / 2, H / 2, 1.5);
    else if (e.key === "-") zoomAt(W / 2, H / 2, 1 / 1.5);
    else if (e.key === "Escape") { showNeighbours(-1); setSelection([]); }
  });
  window.addEventListener("resize", resize);

  // ---- a read-only hook for tests and benchmarks ---------------------------------------------------
  const hook = {
    screenPos(i) {
      const r = canvas.getBoundingClientRect();
      return [r.left + toScreenX(i) / dpr, r.top + toScreenY(i) / dpr];
    },
    groupSize(name) {
      const g = D.groupNames.indexOf(name);
      return g < 0 ? 0 : groupCount[g];
    },
    itemOf(path) { return paths.indexOf(path); },
    pathOf(i) { return paths[i]; },
    colorOf(i) { return rgb[groupOf[i]].slice(); },
  };
  Object.defineProperties(hook, {
    drawn: { get: () => stats.drawn, enumerable: true },
    thumbsDrawn: { get: () => stats.thumbs, enumerable: true },
    frames: { get: () => stats.frames, enumerable: true },
    shown: { value: N, enumerable: true },
    total: { value: D.total, enumerable: true },
    k: { value: K, enumerable: true },
    atlases: { value: atlasBlocks.length, enumerable: true },
    atlasesLoaded: { get: () => atlasesLoaded, enumerable: true },
    firstPaintMs: { get: () => stats.firstPaintMs, enumerable: true },
    frameTimes: { get: () => frameTimes.slice(), enumerable: true },
    lastPhases: { get: () => stats.phases.slice(), enumerable: true },
    selection: { get: () => selection.slice(), enumerable: true },
    focus: { get: () => focus, enumerable: true },
    thumbSide: { get: () => thumbPx() / dpr, enumerable: true }, // CSS px
    frameSide: { get: () => frameWidth(thumbPx()) / dpr, enumerable: true }, // CSS px
    previewSource: { get: () => previewSource, enumerable: true }, // "thumbnail" or "original"
  });
  Object.freeze(hook);
  Object.defineProperty(window, "__map", { value: hook, writable: false, configurable: false });

  resize();
  schedule();
  // Dots first (the first paint needs no image), thumbnails once the atlases are decoded.
  requestAnimationFrame(() => setTimeout(loadAtlases, 0));
})();
