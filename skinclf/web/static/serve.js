// `skinclf serve`'s page: the images go to this server's API (POST /api/predict), which answers
// with predict's rows. What the exported site shares with it is in page.js (window.skinclfPage).
"use strict";
(function () {
  const P = window.skinclfPage, $ = P.$, setStatus = P.setStatus, count = P.count;
  // The spelled-out class names come from the server (/api/model class_names: the CSV's top1_name
  // and the sidecar use the same ones, skinclf.batch.results.CLASS_NAMES).
  let NAMES = {};
  const EXTENSIONS = [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"];  // what skinclf predict reads in a folder
  const state = { model: null, entries: [], columns: null, queue: [], inFlight: 0, added: 0, waiting: 0,
                  skipped: 0, skippedExamples: [] };

  function fmtMB(bytes) { return (bytes / 1048576).toFixed(1) + " MiB"; }

  async function loadModel() {
    try {
      const r = await fetch("/api/model", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const m = await r.json();
      state.model = m;
      NAMES = m.class_names || {};
      P.showModel({ disclaimer: m.disclaimer, name: m.identity.name, created: m.identity.created, sha256: m.identity.sha256,
                    engine: m.identity.engine, version: m.skinclf,
                    accepted: m.accepted_with || (m.metrics && m.metrics.validation) });
      state.columns = m.columns;
    } catch (e) {
      $("model-name").textContent = "model information unavailable (" + e.message + ")";
    }
  }

  function wanted(relPath) {
    // A folder is filtered as skinclf predict filters it: visible files with an image extension.
    const parts = relPath.split("/");
    const dot = relPath.lastIndexOf(".");
    const ok = !parts.some((p) => p.startsWith(".")) && dot >= 0 && EXTENSIONS.includes(relPath.slice(dot).toLowerCase());
    if (!ok) {  // passed over, but counted and named in the summary, as skinclf predict does
      state.skipped++;
      if (state.skippedExamples.length < 3) state.skippedExamples.push(relPath);
    }
    return ok;
  }

  function add(items) {
    // items: [{file, name}] ; name is the row's path (relative to a chosen folder)
    if (!items.length) { setStatus("No images found there (looked for " + EXTENSIONS.join(", ") + ")."); return; }
    const limits = state.model ? state.model.limits : null;
    for (const it of items) {
      const e = { id: state.added++, name: it.name, file: it.file, status: "pending", row: null, url: null };
      if (limits && it.file.size > limits.max_file_bytes) {
        e.status = "error";
        e.localError = "file too large (" + fmtMB(it.file.size) + "; the server accepts up to " + fmtMB(limits.max_file_bytes) + ")";
      } else {
        state.queue.push(e);
      }
      state.entries.push(e);
    }
    render();
    pump();
  }

  function nextChunk() {
    const limits = state.model ? state.model.limits : { max_files: 16, max_request_bytes: 64 * 1048576 };
    const maxFiles = Math.min(16, limits.max_files);
    const budget = limits.max_request_bytes - 64 * 1024;  // room for multipart headers
    const chunk = [];
    let bytes = 0;
    while (state.queue.length && chunk.length < maxFiles) {
      const size = state.queue[0].file.size + 1024;
      if (chunk.length && bytes + size > budget) break;
      bytes += size;
      chunk.push(state.queue.shift());
    }
    return chunk;
  }

  function pump() {
    while (state.inFlight < 2 && state.queue.length) send(nextChunk());
    updateStatus();
  }

  function busyWait(r, attempt) {
    // 503 with Retry-After: the server is busy decoding other images; try again (a few times) later.
    // A 503 without it (the model has stopped) is reported on the rows instead.
    const after = r.status === 503 ? parseInt(r.headers.get("Retry-After"), 10) : NaN;
    return after >= 0 && attempt < 5 ? Math.max(1, after) * 1000 : 0;
  }

  function withName(row, name) {
    // Browsers send '"', CR and LF in an uploaded file's name as %22, %0D, %0A (HTML's form encoding),
    // which the server cannot tell from a name that really holds "%22": the page knows the true name.
    const sent = name.replace(/"/g, "%22").replace(/\r/g, "%0D").replace(/\n/g, "%0A");
    if (sent === name || typeof row.path !== "string" || !row.path.endsWith(sent)) return row;
    return Object.assign({}, row, { path: row.path.slice(0, row.path.length - sent.length) + name });
  }

  async function send(chunk, attempt) {
    attempt = attempt || 0;
    state.inFlight++;
    const form = new FormData();
    for (const e of chunk) form.append("files", e.file, e.name);
    // Patient metadata (age, sex, body site), one entry per file in upload order (null: none), as the API takes it.
    if (chunk.some((e) => e.meta)) form.append("metadata", JSON.stringify(chunk.map((e) => e.meta || null)));
    try {
      const r = await fetch("/api/predict?all_probs=true", { method: "POST", body: form, cache: "no-store" });
      const wait = busyWait(r, attempt);
      if (wait) {
        state.waiting++;
        setTimeout(() => { state.waiting--; send(chunk, attempt + 1); }, wait);
        return;
      }
      let body = null;
      try { body = await r.json(); } catch (_) { body = null; }
      if (!r.ok) {
        const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : r.statusText;
        throw new Error("server answered " + r.status + ": " + detail);
      }
      state.columns = body.columns;
      body.results.forEach((row, i) => {
        const e = chunk[i];
        e.row = withName(row, e.name);
        e.status = row.error ? "error" : "done";
      });
    } catch (err) {
      for (const e of chunk) { e.status = "error"; e.localError = String(err.message || err); }
    } finally {
      state.inFlight--;
      render();
      pump();
    }
  }

  function updateStatus() {
    const t = P.tally(state.entries);
    if (!t.n) { setStatus(""); }
    else if (t.pending) {
      setStatus("Classifying: " + (t.n - t.pending) + " of " + t.n + " images done." +
                (state.waiting ? " The server is busy: trying again in a few seconds." : ""));
    }
    else {
      setStatus(P.summary(t, state.skipped ? "; " + count(state.skipped, "other file") + " passed over (hidden, or not " +
        EXTENSIONS.join(", ") + ": e.g. " + state.skippedExamples.join(", ") + ")" : ""));
    }
    P.enableActions(t);
  }

  function metaForm(e) {
    // Optional age, sex and body site for this image; the server checks them as predict --metadata does.
    const m = state.model && state.model.metadata;
    if (!m || !m.available) return null;
    return P.metaForm(e, { age: m.age || [0, 120], sexes: m.sexes, sites: m.sites.concat(m.site_groups) }, (entry, v) => {
      entry.meta = { age: v.age === "" ? null : v.age, sex: v.sex, site: v.site };
      entry.status = "pending"; entry.row = null; entry.localError = null;
      state.queue.push(entry); render(); pump();
    });
  }

  const PAGE = { names: {}, lazy: false, metaForm };

  function render() {
    PAGE.names = NAMES;
    $("results").replaceChildren(...P.sorted(state.entries).map((e) => P.renderEntry(e, PAGE)));
    updateStatus();
  }

  function csvText() {
    // The rows skinclf predict writes: its columns, its cells (as the server formatted them), sorted by path.
    let header = (state.columns || ["path", "error"]).filter((c) => c !== "metadata");
    if (!$("allprobs").checked) header = header.filter((c) => !c.startsWith("prob_"));
    // The metadata column (used / missing), as predict --metadata writes it, once any image was sent with some.
    if (state.entries.some((e) => e.row && e.row.metadata !== undefined)) header = header.concat(["metadata"]);
    return P.csvText(header, state.entries.map((e) => P.csvRow(e, header, !!e.row && !e.localError)));
  }

  P.bind({
    wanted, add, render, csvText,
    clear() {
      for (const e of state.entries) if (e.url) URL.revokeObjectURL(e.url);
      state.entries = []; state.skipped = 0; state.skippedExamples = []; render();
    },
  });
  window.skinclf = { csvText };  // for scripted checks
  loadModel();
})();
