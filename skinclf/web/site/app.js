// skinclf in the browser: the row `skinclf predict` writes, computed on this device.
// Decode + resize as skinclf/data/images.py does (Pillow), run model.onnx with ONNX Runtime Web
// (colour constancy, prior shift, melanoma weight and temperature are inside the graph), then
// the out-of-distribution score of skinclf/model/outlier.py and the metadata head of
// skinclf/model/patient_head.py, from skinclf-web.json. Nothing is sent anywhere.
"use strict";
(function () {
  const P = window.skinclfPage, $ = P.$, setStatus = P.setStatus, count = P.count;  // page.js: what serve's page shares
  const state = { cfg: null, session: null, entries: [], queue: [], running: false, added: 0, nodes: new Map(),
                  timings: { chosen: null, firstResult: null, modelReady: null, perImage: [] } };

  // --- configuration and model ------------------------------------------------------------------
  function b64floats(rec) {
    const bin = atob(rec.base64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const f32 = new Float32Array(bytes.buffer);
    return Float64Array.from(f32);
  }

  function prepareGaussian(g) {
    // Precomputed as in outlier.distances: means (m, d), components V (r, d), eigenvalues l (r), s2.
    const [m, d] = g.means.shape, r = g.components.shape[0];
    const means = b64floats(g.means), V = b64floats(g.components), lam = b64floats(g.eigenvalues);
    const s2 = g.residual_variance;
    const meanSq = new Float64Array(m), meanProj = new Float64Array(m * r);
    for (let c = 0; c < m; c++) {
      let s = 0;
      for (let k = 0; k < d; k++) s += means[c * d + k] * means[c * d + k];
      meanSq[c] = s;
      for (let j = 0; j < r; j++) {
        let p = 0;
        for (let k = 0; k < d; k++) p += means[c * d + k] * V[j * d + k];
        meanProj[c * r + j] = p;
      }
    }
    const w = new Float64Array(r);
    for (let j = 0; j < r; j++) w[j] = 1 / lam[j] - 1 / s2;
    return { m, d, r, means, V, s2, meanSq, meanProj, w };
  }

  function distances(f, g) {
    // Squared Mahalanobis distance of features f to every mean (PPCA precision), as outlier.distances.
    const { m, d, r, means, V, s2, meanSq, meanProj, w } = g;
    let fsq = 0;
    for (let k = 0; k < d; k++) fsq += f[k] * f[k];
    const fp = new Float64Array(r);
    for (let j = 0; j < r; j++) { let p = 0; for (let k = 0; k < d; k++) p += f[k] * V[j * d + k]; fp[j] = p; }
    const out = new Float64Array(m);
    for (let c = 0; c < m; c++) {
      let dot = 0;
      for (let k = 0; k < d; k++) dot += f[k] * means[c * d + k];
      let s = (fsq - 2 * dot + meanSq[c]) / s2;
      for (let j = 0; j < r; j++) { const q = fp[j] - meanProj[c * r + j]; s += q * q * w[j]; }
      out[c] = s;
    }
    return out;
  }

  function oodScore(logits, features) {
    const o = state.cfg.ood;
    if (!o) return -logsumexp(logits);  // energy, never flagged
    if (o.score === "mahalanobis" || o.score === "relative_mahalanobis") {
      const md = distances(features, state.gClass);
      if (o.score === "relative_mahalanobis") { const bg = distances(features, state.gBack); for (let c = 0; c < md.length; c++) md[c] -= bg[0]; }
      return Math.min(...md);
    }
    if (o.score === "max_logit") return -Math.max(...logits);
    if (o.score === "max_prob") return -Math.exp(Math.max(...logits) - logsumexp(logits));
    return -logsumexp(logits);
  }

  function tierOf(score) {
    // outlier.levels: 1 above the threshold ("unusual"), 2 above rare_threshold ("very unlike").
    const o = state.cfg.ood;
    if (!o) return 0;
    let level = score > o.threshold ? 1 : 0;
    if (o.rare_threshold !== null && o.rare_threshold !== undefined && score > o.rare_threshold) level = 2;
    return level;
  }

  function percentileOf(score) {
    // outlier.percentile: the share (0-100) of the validation images scoring lower, the score
    // rounded to float32 as the stored scores are (numpy searchsorted, side "left"); null: none.
    const ref = state.reference;
    if (!ref || !Number.isFinite(score)) return null;
    const probe = Math.fround(score);
    let lo = 0, hi = ref.length;
    while (lo < hi) { const mid = (lo + hi) >>> 1; if (ref[mid] < probe) lo = mid + 1; else hi = mid; }
    return 100 * lo / ref.length;
  }

  function pyFixed(v, digits) {
    // Python's f"{v:.Nf}": the double's exact decimal value rounded half to even (toFixed rounds
    // an exact tie such as 6.25 up, Python to 6.2).
    const exact = Math.abs(v).toFixed(100);
    const dot = exact.indexOf(".");
    const kept = exact.slice(0, dot + 1 + digits), next = exact.charAt(dot + 1 + digits);
    const rest = exact.slice(dot + 2 + digits);
    const tie = next === "5" && /^0*$/.test(rest);
    const lastDigit = Number(kept.charAt(kept.length - 1));
    const text = tie && lastDigit % 2 === 0 ? kept.replace(/\.$/, "") : Math.abs(v).toFixed(digits);
    return (v < 0 || Object.is(v, -0) ? "-" : "") + text;
  }

  function logsumexp(z) {
    const top = Math.max(...z);
    let s = 0;
    for (const v of z) s += Math.exp(v - top);
    return top + Math.log(s);
  }

  function softmax(z) {
    const top = Math.max(...z);
    const e = Array.from(z, (v) => Math.exp(v - top));
    const s = e.reduce((a, b) => a + b, 0);
    return e.map((v) => v / s);
  }

  async function loadAll() {
    const r = await fetch("skinclf-web.json", { cache: "no-cache" });
    if (!r.ok) throw new Error("skinclf-web.json: HTTP " + r.status);
    const cfg = await r.json();
    state.cfg = cfg;
    P.showModel({ disclaimer: cfg.disclaimer, name: cfg.model.name, created: cfg.model.created, sha256: cfg.model.source_sha256,
                  engine: "ONNX Runtime Web " + cfg.runtime.version + " (WebAssembly, " + cfg.model.weights + " weights)",
                  version: cfg.skinclf, accepted: cfg.metrics.accepted_with });
    $("ort-version").textContent = cfg.runtime.version;
    if (cfg.ood && cfg.ood.features) {
      state.gClass = prepareGaussian(cfg.ood.features.class);
      if (cfg.ood.features.background) state.gBack = prepareGaussian(cfg.ood.features.background);
    }
    if (cfg.ood && cfg.ood.reference_scores) state.reference = float32s(cfg.ood.reference_scores.base64);
    if (cfg.metadata_head) state.head = prepareHead(cfg.metadata_head);
    if (cfg.classifier) state.classifier = prepareClassifier(cfg.classifier);
    ort.env.wasm.numThreads = 1;  // single-threaded: works from any static server, no cross-origin isolation
    ort.env.wasm.proxy = false;
    ort.env.wasm.wasmPaths = new URL("ort/", document.baseURI).href;
    state.session = await ort.InferenceSession.create(cfg.model.file, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    state.outputs = cfg.model.outputs.filter((n) => state.session.outputNames.includes(n));
    state.timings.modelReady = performance.now();
    setStatus("Model ready. Choose or drop images: they stay on this device.");
    pump();
  }

  // --- decoding and resizing, as skinclf.data.images.load_image --------------------------------------
  function sniff(b) {
    if (b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return "JPEG";
    if (b.length >= 8 && b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47) return "PNG";
    if (b.length >= 2 && b[0] === 0x42 && b[1] === 0x4d) return "BMP";
    if (b.length >= 4 && ((b[0] === 0x49 && b[1] === 0x49 && b[2] === 0x2a && b[3] === 0) || (b[0] === 0x4d && b[1] === 0x4d && b[2] === 0 && b[3] === 0x2a))) return "TIFF";
    return null;
  }

  class ImageError extends Error {}

  function draftFactor(w, h, size) {
    const scale = Math.min(Math.floor(w / size), Math.floor(h / size));
    for (const f of [8, 4, 2]) if (f <= scale) return f;
    return 1;
  }

  function reduce(rgb, w, h, f) {
    // Image.reduce(f): box mean over f x f pixels (partial boxes at the edges over what they cover), rounded.
    const ow = Math.ceil(w / f), oh = Math.ceil(h / f);
    const out = new Uint8ClampedArray(ow * oh * 3);
    for (let y = 0; y < oh; y++) {
      const y0 = y * f, y1 = Math.min(h, y0 + f);
      for (let x = 0; x < ow; x++) {
        const x0 = x * f, x1 = Math.min(w, x0 + f);
        const n = (y1 - y0) * (x1 - x0);
        let r = 0, g = 0, b = 0;
        for (let yy = y0; yy < y1; yy++) for (let xx = x0; xx < x1; xx++) {
          const i = (yy * w + xx) * 3; r += rgb[i]; g += rgb[i + 1]; b += rgb[i + 2];
        }
        const o = (y * ow + x) * 3, half = n >> 1;
        out[o] = Math.floor((r + half) / n); out[o + 1] = Math.floor((g + half) / n); out[o + 2] = Math.floor((b + half) / n);
      }
    }
    return { rgb: out, w: ow, h: oh };
  }

  const PRECISION_BITS = 22, ONE = 1 << PRECISION_BITS;
  function coeffs(inSize, outSize) {
    // Pillow's precompute_coeffs + normalize_coeffs_8bpc for the bilinear (triangle) filter.
    const scale = inSize / outSize, filterscale = Math.max(scale, 1), support = filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const kk = new Int32Array(outSize * ksize), bounds = new Int32Array(outSize * 2);
    const tmp = new Float64Array(ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale, ss = 1 / filterscale;
      let xmin = Math.trunc(center - support + 0.5); if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5); if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      let ww = 0;
      for (let x = 0; x < xmax; x++) {
        const t = Math.abs((x + xmin - center + 0.5) * ss);
        const wgt = t < 1 ? 1 - t : 0;
        tmp[x] = wgt; ww += wgt;
      }
      for (let x = 0; x < xmax; x++) {
        const k = ww !== 0 ? tmp[x] / ww : tmp[x];
        kk[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * ONE) : Math.trunc(0.5 + k * ONE);
      }
      bounds[xx * 2] = xmin; bounds[xx * 2 + 1] = xmax;
    }
    return { kk, bounds, ksize };
  }

  function clip8(v) { return v >= 255 * ONE ? 255 : v <= 0 ? 0 : Math.floor(v / ONE); }

  function pass(src, w, h, size, horizontal) {
    // One pass of Pillow's resample: along rows (horizontal) or columns, 22-bit fixed point, clipped to uint8.
    const n = horizontal ? w : h;
    const { kk, bounds, ksize } = coeffs(n, size);
    const ow = horizontal ? size : w, oh = horizontal ? h : size;
    const out = new Uint8ClampedArray(ow * oh * 3);
    for (let y = 0; y < oh; y++) for (let x = 0; x < ow; x++) {
      const o = horizontal ? x : y, start = bounds[o * 2], count = bounds[o * 2 + 1];
      let r = ONE / 2, g = ONE / 2, b = ONE / 2;
      for (let k = 0; k < count; k++) {
        const c = kk[o * ksize + k];
        const i = horizontal ? (y * w + start + k) * 3 : ((start + k) * w + x) * 3;
        r += src[i] * c; g += src[i + 1] * c; b += src[i + 2] * c;
      }
      const j = (y * ow + x) * 3;
      out[j] = clip8(r); out[j + 1] = clip8(g); out[j + 2] = clip8(b);
    }
    return out;
  }

  function resize(rgb, w, h, size) {
    // Pillow Image.resize((size, size), BILINEAR): two passes, uint8 in between; Pillow runs the
    // vertical pass first when the image is taller than wide (measured: exact on lossless images).
    if (h > w) {
      const mid = h !== size ? pass(rgb, w, h, size, false) : rgb;
      return w !== size ? pass(mid, w, size, size, true) : mid;
    }
    const mid = w !== size ? pass(rgb, w, h, size, true) : rgb;
    return h !== size ? pass(mid, size, h, size, false) : mid;
  }

  async function decode(file) {
    const cfg = state.cfg, size = cfg.input_size, E = cfg.errors;
    if (file.size === 0) throw new ImageError(E.empty);
    const head = new Uint8Array(await file.slice(0, 16).arrayBuffer());
    const kind = sniff(head);
    if (!kind) throw new ImageError(E.not_an_image);
    if (kind === "TIFF") throw new ImageError(E.tiff);
    let bitmap;
    try {
      bitmap = await createImageBitmap(file, { imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none" });
    } catch (err) {
      throw new ImageError("cannot decode image: " + (err && err.message ? err.message : "the browser could not read it"));
    }
    const w = bitmap.width, h = bitmap.height;
    const notes = [];
    try {
      if (w * h > cfg.preprocessing.max_pixels) {
        throw new ImageError(E.too_large.replace("{w}", w).replace("{h}", h).replace("{limit}", cfg.preprocessing.max_pixels.toLocaleString("en-US")));
      }
      if (Math.min(w, h) < size * cfg.preprocessing.min_side_share) {
        notes.push(cfg.warnings.too_small.replace("{w}", w).replace("{h}", h).replace(/\{n\}/g, size));
      }
      const canvas = new OffscreenCanvas(w, h);
      const ctx = canvas.getContext("2d", { willReadFrequently: true, colorSpace: "srgb" });
      ctx.drawImage(bitmap, 0, 0);
      const rgba = ctx.getImageData(0, 0, w, h).data;
      let rgb = new Uint8ClampedArray(w * h * 3);
      for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
        const a = rgba[i + 3];
        if (a === 255) { rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2]; }
        else { rgb[j] = Math.round(rgba[i] * a / 255); rgb[j + 1] = Math.round(rgba[i + 1] * a / 255); rgb[j + 2] = Math.round(rgba[i + 2] * a / 255); }
      }
      let cw = w, ch = h;
      const f = draftFactor(w, h, size);
      if (f > 1) { const r = reduce(rgb, w, h, f); rgb = r.rgb; cw = r.w; ch = r.h; }
      const pixels = cw === size && ch === size ? rgb : resize(rgb, cw, ch, size);
      return { pixels, notes };
    } finally {
      bitmap.close();
    }
  }

  // --- the metadata head (skinclf.model.patient_head.MetadataHead.apply) ------------------------------------
  function prepareHead(spec) {
    return spec;
  }

  function encodeMeta(m) {
    const md = state.cfg.metadata, nSex = md.sexes.length, nSite = md.sites.length;
    const x = new Float64Array(md.encoding_width);
    if (m.age === null || m.age === undefined || m.age === "") x[2] = 1;
    else { const a = (Number(m.age) - md.age_center) / md.age_scale; x[0] = a; x[1] = a * a; }
    const sex0 = 3, site0 = 3 + nSex + 1;
    const si = md.sexes.indexOf(m.sex);
    x[sex0 + (si >= 0 ? si : nSex)] = 1;
    if (!m.site) x[site0 + nSite] = 1;
    else {
      const covered = md.site_groups[m.site] || [m.site];
      for (const s of covered) x[site0 + md.sites.indexOf(s)] = 1 / covered.length;
    }
    return x;
  }

  function matvec(x, W, b) {
    // x (n) @ W (n, k) + b (k)
    const k = b.length, out = Float64Array.from(b);
    for (let i = 0; i < x.length; i++) { const xi = x[i]; if (xi === 0) continue; const row = W[i]; for (let j = 0; j < k; j++) out[j] += xi * row[j]; }
    return out;
  }

  function applyHead(logits, features, meta) {
    const h = state.head, n = logits.length;
    const xm = encodeMeta(meta);
    const parts = { metadata: Array.from(xm), logits: Array.from(logits) };
    if (h.inputs.includes("features")) parts.features = Array.from(features, (v, i) => (v - h.feature_center[i]) / h.feature_scale[i]);
    let x = [].concat(...h.inputs.map((k) => parts[k]));
    if (h.hidden) x = Array.from(matvec(x, h.hidden.W, h.hidden.b), (v) => Math.max(v, 0));
    const out = h.out || { W: null, b: new Array(n).fill(0) };
    const lw = h.logit_weight === undefined ? 1 : h.logit_weight;
    const shift = h.shift || new Array(n).fill(0);
    const g = out.W ? matvec(x, out.W, out.b) : Float64Array.from(out.b);
    const fused = new Float64Array(n);
    for (let c = 0; c < n; c++) fused[c] = lw * logits[c] + g[c] + shift[c];
    if (h.metadata_model) {
      const mm = h.metadata_model, m = matvec(xm, mm.W, mm.b);
      const top = Math.max(...m);
      let s = 0;
      for (let c = 0; c < n; c++) { m[c] -= top; s += Math.exp(m[c]); }
      for (let c = 0; c < n; c++) fused[c] += mm.weight * (m[c] - Math.log(s) - mm.log_prior[c]);
    }
    const t = h.temperature === undefined ? 1 : h.temperature;
    return Array.from(fused, (v) => Math.fround(v / t));
  }

  function hasMeta(m) { return !!m && ((m.age !== null && m.age !== undefined && m.age !== "") || !!m.sex || !!m.site); }

  // --- the classifier: one affine map of the pooled features (skinclf.model.head) -----------------
  function float32s(b64) {
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    return new Float32Array(bytes.buffer);  // little-endian, as every browser's typed arrays are
  }

  function prepareClassifier(c) {
    return { rows: c.shape[0], cols: c.shape[1], w: float32s(c.weight), b: float32s(c.bias) };
  }

  function classifierLogits(features) {
    const c = state.classifier, z = new Array(c.cols);
    for (let j = 0; j < c.cols; j++) {
      let s = c.b[j];
      for (let i = 0; i < c.rows; i++) s += features[i] * c.w[i * c.cols + j];
      z[j] = Math.fround(s);  // float32, as LinearHead.__call__
    }
    return z;
  }

  // --- one image to one predict row ----------------------------------------------------------------
  async function classify(e) {
    const cfg = state.cfg, size = cfg.input_size;
    if (!e.logits) {
      const { pixels, notes } = await decode(e.file);
      const input = new Float32Array(size * size * 3);
      for (let i = 0; i < input.length; i++) input[i] = pixels[i];
      const out = await state.session.run({ image: new ort.Tensor("float32", input, [1, size, size, 3]) }, state.outputs);
      e.features = out.features ? Float64Array.from(out.features.data) : null;
      e.logits = state.classifier ? classifierLogits(e.features) : Array.from(out.logits.data);
      e.notes = notes;
      for (const k of Object.keys(out)) if (out[k].dispose) out[k].dispose();
    }
    return rowOf(e.name, e.logits, e.features, e.notes, e.meta);
  }

  function rowOf(name, logits, features, notes, meta) {
    // skinclf.batch.results.batch_rows for one image: the OOD score, tier and percentile from the
    // image's own logits (before metadata), then the head, the warnings (the image's, then the tier's).
    const cfg = state.cfg;
    const score = oodScore(logits, features);
    const level = tierOf(score);
    const used = !!state.head && hasMeta(meta);
    const probs = softmax(used ? applyHead(logits, features, meta) : logits);
    const warnings = notes.slice();
    if (level === 1) warnings.push(cfg.warnings.unusual);
    if (level === 2) warnings.push(cfg.warnings.very_unlike);
    return makeRow(name, probs, percentileOf(score), warnings, used);
  }

  function warningCell(messages) {
    const cleaned = messages.map((m) => m.replace(/;/g, ",").split(/\s+/).filter((w) => w).join(" ")).filter((m) => m);
    return Array.from(new Set(cleaned)).join(state.cfg.warnings.separator);
  }

  function makeRow(path, probs, pct, warnings, used) {
    // skinclf.batch.results.row, keyed by column: top-k (ties keep class order), top1_name,
    // prob_<class> (for --all-probs), mel_prob, ood_percentile (one decimal), error, warning.
    const cfg = state.cfg, classes = cfg.classes;
    const order = classes.map((_, i) => i).sort((a, b) => probs[b] - probs[a] || a - b).slice(0, cfg.top_k);
    const row = { path, error: "", warning: warningCell(warnings), ood_percentile: pct === null ? "" : pyFixed(pct, 1) };
    order.forEach((c, i) => { row["top" + (i + 1) + "_class"] = classes[c]; row["top" + (i + 1) + "_prob"] = pyFixed(probs[c], 4); });
    row.top1_name = cfg.class_names[row.top1_class] || row.top1_class;
    classes.forEach((c, i) => { row["prob_" + c] = pyFixed(probs[i], 4); });
    if (classes.includes("mel")) row.mel_prob = row.prob_mel;
    row.metadata = used ? "used" : "missing";
    return row;
  }

  // --- the queue: one image at a time, the page stays responsive ----------------------------------------
  async function pump() {
    if (state.running || !state.session) return;
    state.running = true;
    try {
      while (state.queue.length) {
        const e = state.queue.shift();
        const t0 = performance.now();
        try {
          e.row = await classify(e);
          e.status = "done";
        } catch (err) {
          e.status = "error";
          e.localError = err instanceof ImageError ? err.message : "cannot classify: " + (err && err.message ? err.message : String(err));
          e.row = null;
        }
        state.timings.perImage.push(performance.now() - t0);
        if (state.timings.firstResult === null && state.timings.chosen !== null) {
          state.timings.firstResult = performance.now();
          $("timing").textContent = "First result " + ((state.timings.firstResult - state.timings.chosen) / 1000).toFixed(2) + " s after the images were chosen.";
        }
        update(e);
        updateStatus();
        await new Promise((r) => setTimeout(r, 0));
      }
    } finally {
      state.running = false;
      updateStatus();
    }
  }

  function wanted(relPath) {
    const parts = relPath.split("/");
    if (parts.some((p) => p.startsWith("."))) return false;
    const dot = relPath.lastIndexOf(".");
    return dot >= 0 && state.cfg.preprocessing.extensions.includes(relPath.slice(dot).toLowerCase());
  }

  function add(items) {
    if (!items.length) { setStatus("No images found there."); return; }
    if (state.timings.chosen === null) state.timings.chosen = performance.now();
    for (const it of items) {
      const e = { id: state.added++, name: it.name, file: it.file, status: "pending", row: null, url: null, meta: null };
      state.entries.push(e);
      state.queue.push(e);
    }
    render();
    pump();
  }

  // --- the page (the parts serve's page shares: page.js) ---------------------------------------------
  function updateStatus() {
    const t = P.tally(state.entries, state.cfg ? state.cfg.warnings.separator : undefined);
    if (!state.session) return;
    if (!t.n) setStatus("Model ready. Choose or drop images: they stay on this device.");
    else if (t.pending) setStatus("Classifying on this device: " + (t.n - t.pending) + " of " + t.n + " images done.");
    else setStatus(P.summary(t));
    P.enableActions(t);
  }

  function oodLine(e) {
    if (e.row.ood_percentile === "") return [];
    return [P.el("p", { class: "oodp" }, "ood_percentile " + e.row.ood_percentile + ": more unusual than " +
                 e.row.ood_percentile + "% of the validation dermoscopic images")];
  }

  function metaForm(e) {
    if (!state.head) return null;
    const md = state.cfg.metadata;
    return P.metaForm(e, { age: md.age, sexes: md.sexes, sites: md.sites.concat(Object.keys(md.site_groups)) }, (entry, v) => {
      const a = v.age === "" ? null : Number(v.age);
      if (a !== null && !(a >= md.age[0] && a <= md.age[1])) { setStatus("Age must be " + md.age[0] + " to " + md.age[1] + " years."); return; }
      entry.meta = { age: a, sex: v.sex, site: v.site };
      entry.status = "pending"; entry.row = null; entry.localError = null;
      state.queue.push(entry); update(entry); pump();
    });
  }

  function renderEntry(e) {
    return P.renderEntry(e, { names: state.cfg.class_names, separator: state.cfg.warnings.separator, lazy: true,
                              extra: oodLine, metaForm });
  }

  function update(e) {
    const old = state.nodes.get(e.id);
    const node = renderEntry(e);
    state.nodes.set(e.id, node);
    if (old && old.parentNode) old.replaceWith(node); else render();
  }

  function render() {
    const nodes = P.sorted(state.entries).map((e) => { const n = renderEntry(e); state.nodes.set(e.id, n); return n; });
    $("results").replaceChildren(...nodes);
    updateStatus();
  }

  function csvText() {
    // The rows skinclf predict writes for these files (its columns; --all-probs when ticked), sorted by path.
    const cfg = state.cfg;
    let header = ($("allprobs").checked ? cfg.columns_all_probs : cfg.columns).slice();
    const withMeta = state.entries.some((e) => hasMeta(e.meta));
    if (withMeta) header = header.concat(["metadata"]);
    return P.csvText(header, state.entries.map((e) => P.csvRow(e, header, e.status === "done")));
  }

  P.bind({
    wanted, add, render, csvText,
    clear() {
      for (const e of state.entries) if (e.url) URL.revokeObjectURL(e.url);
      state.entries = []; state.nodes.clear(); state.timings.chosen = null; state.timings.firstResult = null; render();
    },
  });
  window.skinclf = { csvText, state, decode: (f) => decode(f) };  // for scripted checks
  loadAll().catch((err) => setStatus("Could not load the model: " + (err && err.message ? err.message : String(err))));
})();
