// skinclf in the browser: the row `skinclf predict` writes, computed on this device.
// Decode + resize as skinclf/data/images.py does (Pillow), run model.onnx with ONNX Runtime Web
// (colour constancy, prior shift, melanoma weight and temperature are inside the graph), then
// the out-of-distribution score of skinclf/model/outlier.py and the metadata head of
// skinclf/model/patient_head.py, from skinclf-web.json. Nothing is sent anywhere.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
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
    $("disclaimer").textContent = cfg.disclaimer;
    $("model-name").textContent = cfg.model.name + (cfg.model.created ? " (" + cfg.model.created.slice(0, 10) + ")" : "");
    $("model-sha").textContent = cfg.model.source_sha256.slice(0, 12);
    $("model-sha").title = cfg.model.source_sha256;
    $("model-engine").textContent = "ONNX Runtime Web " + cfg.runtime.version + " (WebAssembly, " + cfg.model.weights + " weights)";
    $("version").textContent = cfg.skinclf;
    $("ort-version").textContent = cfg.runtime.version;
    const v = cfg.metrics.accepted_with || {};
    $("model-metrics-label").textContent = v.split === "test" ? "Held-out test" : "Validation";
    const parts = [];
    if (v.balanced_accuracy != null) parts.push("balanced accuracy " + v.balanced_accuracy.toFixed(3));
    if (v.melanoma && v.melanoma.at_decision) parts.push("melanoma sensitivity " + v.melanoma.at_decision.sensitivity.toFixed(3));
    if (v.n != null) parts.push("on " + v.n + " images");
    $("model-metrics").textContent = parts.length ? parts.join(", ") : "not recorded";
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

  // --- the page ----------------------------------------------------------------------------------------
  function setStatus(text) { $("status").textContent = text; }
  function count(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

  function updateStatus() {
    const n = state.entries.length;
    const pending = state.entries.filter((e) => e.status === "pending").length;
    const errors = state.entries.filter((e) => e.status === "error").length;
    const warned = state.entries.filter((e) => warningsOf(e)).length;
    if (!state.session) return;
    if (!n) setStatus("Model ready. Choose or drop images: they stay on this device.");
    else if (pending) setStatus("Classifying on this device: " + (n - pending) + " of " + n + " images done.");
    else setStatus(count(n, "image") + ": " + (n - errors) + " classified, " + errors + " with errors, " + warned +
                   " with warnings. Decision support, not a diagnosis.");
    $("download").disabled = !n || pending > 0;
    $("clear").disabled = !n || pending > 0;
  }

  function warningsOf(e) {
    if (e.status !== "done" || !e.row || !e.row.warning) return null;
    return e.row.warning.split(state.cfg.warnings.separator).filter((w) => w);
  }

  function melProb(e) {
    if (!e.row || e.status !== "done") return -1;
    return e.row.mel_prob !== undefined ? parseFloat(e.row.mel_prob) : 0;
  }

  function sorted() {
    const list = state.entries.slice();
    const by = $("sort").value;
    if (by === "mel") list.sort((a, b) => melProb(b) - melProb(a) || a.id - b.id);
    else if (by === "path") list.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : a.id - b.id));
    return list;
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function thumb(e) {
    if (!e.url) e.url = URL.createObjectURL(e.file);
    const img = el("img", { src: e.url, alt: "", loading: "lazy" });
    img.addEventListener("error", () => img.replaceWith(el("div", { class: "noimg" }, "no preview")), { once: true });
    return img;
  }

  function renderEntry(e) {
    const names = state.cfg.class_names;
    const li = el("li", { class: "result", "data-path": e.name, "data-state": e.status });
    li.appendChild(thumb(e));
    const info = el("div", { class: "info" });
    info.appendChild(el("p", { class: "path" }, e.name));
    if (e.status === "pending") {
      info.appendChild(el("p", { class: "pending" }, "classifying\u2026"));
    } else if (e.status === "error") {
      info.appendChild(el("p", { class: "error" }, "Could not classify: " + e.localError));
    } else {
      li.setAttribute("data-top1", e.row.top1_class);
      const bars = el("div", { class: "bars", role: "group", "aria-label": "most probable classes" });
      for (let i = 1; e.row["top" + i + "_class"] !== undefined; i++) {
        const cls = e.row["top" + i + "_class"], p = e.row["top" + i + "_prob"];
        const label = el("span", {}, cls + (names[cls] && names[cls] !== cls ? " (" + names[cls] + ")" : ""));
        const track = el("span", { class: "track", role: "meter", "aria-valuemin": "0", "aria-valuemax": "1", "aria-valuenow": p,
                                   "aria-valuetext": cls + " " + p, "aria-label": cls });
        const fill = el("span", { class: "fill" + (cls === "mel" ? " mel" : "") });
        fill.style.display = "block";
        fill.style.width = (parseFloat(p) * 100).toFixed(1) + "%";
        track.appendChild(fill);
        bars.appendChild(label); bars.appendChild(track); bars.appendChild(el("span", { class: "prob" }, p));
      }
      info.appendChild(bars);
      if (e.row.mel_prob !== undefined) info.appendChild(el("p", { class: "melp" }, "melanoma probability " + e.row.mel_prob));
      if (e.row.ood_percentile !== "") {
        info.appendChild(el("p", { class: "oodp" }, "ood_percentile " + e.row.ood_percentile + ": more unusual than " +
                            e.row.ood_percentile + "% of the validation dermoscopic images"));
      }
      for (const w of warningsOf(e) || []) info.appendChild(el("p", { class: "warning", role: "note" }, "\u26A0 Warning: " + w));
      if (warningsOf(e)) li.setAttribute("data-warning", "true");
      if (e.row.metadata === "used") info.appendChild(el("p", { class: "melp" }, "with the patient's age, sex and body site"));
      const form = metaForm(e);
      if (form) info.appendChild(form);
    }
    li.appendChild(info);
    return li;
  }

  function metaForm(e) {
    if (!state.head) return null;
    const md = state.cfg.metadata;
    const box = el("details", { class: "meta" });
    if (e.meta) box.setAttribute("open", "");
    box.appendChild(el("summary", {}, "Age, sex, body site (optional)"));
    const age = el("input", { type: "number", min: String(md.age[0]), max: String(md.age[1]), step: "1", "aria-label": "age in years", placeholder: "age" });
    const sex = el("select", { "aria-label": "sex" });
    const site = el("select", { "aria-label": "body site" });
    sex.appendChild(el("option", { value: "" }, "sex unknown"));
    for (const v of md.sexes) sex.appendChild(el("option", { value: v }, v));
    site.appendChild(el("option", { value: "" }, "site unknown"));
    for (const v of md.sites.concat(Object.keys(md.site_groups))) site.appendChild(el("option", { value: v }, v));
    if (e.meta) { age.value = e.meta.age === null ? "" : e.meta.age; sex.value = e.meta.sex || ""; site.value = e.meta.site || ""; }
    const go = el("button", { type: "button" }, "Classify again with them");
    go.addEventListener("click", () => {
      const a = age.value === "" ? null : Number(age.value);
      if (a !== null && !(a >= md.age[0] && a <= md.age[1])) { setStatus("Age must be " + md.age[0] + " to " + md.age[1] + " years."); return; }
      e.meta = { age: a, sex: sex.value || null, site: site.value || null };
      e.status = "pending"; e.row = null; e.localError = null;
      state.queue.push(e); update(e); pump();
    });
    for (const node of [age, sex, site, go]) box.appendChild(node);
    return box;
  }

  function update(e) {
    const old = state.nodes.get(e.id);
    const node = renderEntry(e);
    state.nodes.set(e.id, node);
    if (old && old.parentNode) old.replaceWith(node); else render();
  }

  function render() {
    const nodes = sorted().map((e) => { const n = renderEntry(e); state.nodes.set(e.id, n); return n; });
    $("results").replaceChildren(...nodes);
    updateStatus();
  }

  // skinclf/batch/results.py csv_cell, mirrored (as in serve's page): backslashes doubled, a leading '
  // on text a spreadsheet would run as a formula (= + - @ tab CR, also after leading quotes; numbers
  // excepted), every cell quoted.
  const FORMULA_START = /^'*[=+\-@\t\r]/;
  const NUMBER = /^-?[0-9]+(\.[0-9]+)?$/;
  function csvCell(v) {
    let text = String(v).replace(/\\/g, "\\\\");
    if (FORMULA_START.test(text) && !NUMBER.test(text)) text = "'" + text;
    return '"' + text.replace(/"/g, '""') + '"';
  }

  function csvText() {
    // The rows skinclf predict writes for these files (its columns; --all-probs when ticked), sorted by path.
    const cfg = state.cfg;
    let header = ($("allprobs").checked ? cfg.columns_all_probs : cfg.columns).slice();
    const withMeta = state.entries.some((e) => hasMeta(e.meta));
    if (withMeta) header = header.concat(["metadata"]);
    const rows = state.entries.map((e) => header.map((c) => {
      if (e.status === "done") return e.row[c] === undefined ? "" : e.row[c];
      if (c === "path") return e.name;
      if (c === "error") return (e.localError || "not classified").split(/\s+/).join(" ");
      return "";
    }));
    rows.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    return [header, ...rows].map((r) => r.map(csvCell).join(",")).join("\n") + "\n";
  }

  function download() {
    const url = URL.createObjectURL(new Blob([csvText()], { type: "text/csv" }));
    const a = el("a", { href: url, download: "results.csv" });
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  function fromInput(input, folder) {
    const items = [];
    for (const f of input.files) {
      let name = folder && f.webkitRelativePath ? f.webkitRelativePath : f.name;
      if (folder) {
        name = name.split("/").slice(1).join("/");
        if (!wanted(name)) continue;
      }
      items.push({ file: f, name });
    }
    input.value = "";
    add(items);
  }

  function readEntries(reader) { return new Promise((resolve, reject) => reader.readEntries(resolve, reject)); }

  async function dropped(dt) {
    const items = [];
    const entries = Array.from(dt.items || []).map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null));
    if (entries.length && entries.every((x) => x)) {
      for (const entry of entries) {
        if (entry.isDirectory) await walkDir(entry, "", items);
        else items.push({ file: await new Promise((resolve, reject) => entry.file(resolve, reject)), name: entry.name });
      }
    } else {
      for (const f of dt.files) items.push({ file: f, name: f.name });
    }
    add(items);
  }

  async function walkDir(dir, prefix, out) {
    const reader = dir.createReader();
    for (let batch = await readEntries(reader); batch.length; batch = await readEntries(reader)) {
      for (const child of batch) {
        const rel = prefix + child.name;
        if (child.isDirectory) { if (!child.name.startsWith(".")) await walkDir(child, rel + "/", out); }
        else if (wanted(rel)) out.push({ file: await new Promise((resolve, reject) => child.file(resolve, reject)), name: rel });
      }
    }
  }

  $("pick-files").addEventListener("click", () => $("files").click());
  $("pick-folder").addEventListener("click", () => $("folder").click());
  $("files").addEventListener("change", (ev) => fromInput(ev.target, false));
  $("folder").addEventListener("change", (ev) => fromInput(ev.target, true));
  $("sort").addEventListener("change", render);
  $("download").addEventListener("click", download);
  $("clear").addEventListener("click", () => {
    for (const e of state.entries) if (e.url) URL.revokeObjectURL(e.url);
    state.entries = []; state.nodes.clear(); state.timings.chosen = null; state.timings.firstResult = null; render();
  });
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); dropped(ev.dataTransfer).catch((err) => setStatus("Could not read the dropped items: " + err.message)); });
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
  window.skinclf = { csvText, state, decode: (f) => decode(f) };  // for scripted checks
  loadAll().catch((err) => setStatus("Could not load the model: " + (err && err.message ? err.message : String(err))));
})();
