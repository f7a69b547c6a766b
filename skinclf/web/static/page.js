// What the two pages share: `skinclf serve`'s page (serve.js: uploads to the API) and the site
// `skinclf export --format web` writes (app.js: ONNX Runtime Web in the browser). Both show the
// model, take images, render one row per image (top-k bars, melanoma probability, warnings,
// optional age/sex/site) and download the CSV `skinclf predict` writes. One copy, here: serve
// answers it at /static/page.js and the export copies it next to app.js. No state of its own:
// each page keeps its entries and passes them in.
"use strict";
window.skinclfPage = (function () {
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(text) { $("status").textContent = text; }
  function count(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

  function showModel(m) {
    // The model panel: m = { disclaimer, name, created, sha256, engine, version, accepted: the
    // figures it was accepted with ({split, balanced_accuracy, melanoma, n}) }.
    $("disclaimer").textContent = m.disclaimer;
    $("model-name").textContent = m.name + (m.created ? " (" + m.created.slice(0, 10) + ")" : "");
    $("model-sha").textContent = m.sha256.slice(0, 12);
    $("model-sha").title = m.sha256;
    $("model-engine").textContent = m.engine;
    $("version").textContent = m.version;
    const v = m.accepted || {};
    $("model-metrics-label").textContent = v.split === "test" ? "Held-out test" : "Validation";
    const parts = [];
    if (v.balanced_accuracy != null) parts.push("balanced accuracy " + v.balanced_accuracy.toFixed(3));
    if (v.melanoma && v.melanoma.at_decision) parts.push("melanoma sensitivity " + v.melanoma.at_decision.sensitivity.toFixed(3));
    if (v.n != null) parts.push("on " + v.n + " images");
    $("model-metrics").textContent = parts.length ? parts.join(", ") : "not recorded";
  }

  // --- the rows ----------------------------------------------------------------------------------------
  // An entry: { id, name (the row's path), file, status: pending | done | error, row (predict's
  // cells by column, as strings), localError, url (the thumbnail), meta ({age, sex, site}) }.

  function warningsOf(e, separator) {
    // The CSV's warning cell: cautions about a classified image, joined by "; " (skinclf.batch.results).
    if (e.status !== "done" || !e.row || !e.row.warning) return null;
    return e.row.warning.split(separator || "; ").filter((w) => w);
  }

  function tally(entries, separator) {
    // For the status line: how many images, how many still pending, with errors, with warnings.
    return { n: entries.length, pending: entries.filter((e) => e.status === "pending").length,
             errors: entries.filter((e) => e.status === "error").length,
             warned: entries.filter((e) => warningsOf(e, separator)).length };
  }

  function summary(t, passedOver) {
    // The status line once every image is done (passedOver: what a folder held that was not taken).
    return count(t.n, "image") + ": " + (t.n - t.errors) + " classified, " + t.errors + " with errors, " + t.warned +
           " with warnings" + (passedOver || "") + ". Decision support, not a diagnosis.";
  }

  function enableActions(t) {
    // Download and Clear: once there are images and none is pending.
    $("download").disabled = !t.n || t.pending > 0;
    $("clear").disabled = !t.n || t.pending > 0;
  }

  function melProb(e) {
    // For sorting: the row's melanoma probability; -1 for an image not (yet) classified.
    if (!e.row || e.row.error) return -1;
    if (e.row.prob_mel !== undefined && e.row.prob_mel !== "") return parseFloat(e.row.prob_mel);
    if (e.row.mel_prob !== undefined && e.row.mel_prob !== "") return parseFloat(e.row.mel_prob);
    for (let i = 1; e.row["top" + i + "_class"] !== undefined; i++) if (e.row["top" + i + "_class"] === "mel") return parseFloat(e.row["top" + i + "_prob"]);
    return 0;
  }

  function sorted(entries) {
    const list = entries.slice();
    const by = $("sort").value;
    if (by === "mel") list.sort((a, b) => melProb(b) - melProb(a) || a.id - b.id);
    else if (by === "path") list.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : a.id - b.id));
    return list;
  }

  function thumb(e, lazy) {
    if (!e.url) e.url = URL.createObjectURL(e.file);
    const img = el("img", lazy ? { src: e.url, alt: "", loading: "lazy" } : { src: e.url, alt: "" });
    img.addEventListener("error", () => img.replaceWith(el("div", { class: "noimg" }, "no preview")), { once: true });
    return img;
  }

  function bars(row, names) {
    // The top-k classes as meters, with their names and the probabilities as predict writes them.
    const box = el("div", { class: "bars", role: "group", "aria-label": "most probable classes" });
    for (let i = 1; row["top" + i + "_class"] !== undefined; i++) {
      const cls = row["top" + i + "_class"], p = row["top" + i + "_prob"];
      const label = el("span", {}, cls + (names[cls] && names[cls] !== cls ? " (" + names[cls] + ")" : ""));
      const track = el("span", { class: "track", role: "meter", "aria-valuemin": "0", "aria-valuemax": "1", "aria-valuenow": p,
                                 "aria-valuetext": cls + " " + p, "aria-label": cls });
      const fill = el("span", { class: "fill" + (cls === "mel" ? " mel" : "") });
      fill.style.display = "block";
      fill.style.width = (parseFloat(p) * 100).toFixed(1) + "%";
      track.appendChild(fill);
      box.appendChild(label); box.appendChild(track); box.appendChild(el("span", { class: "prob" }, p));
    }
    return box;
  }

  function renderEntry(e, page) {
    // One result: page = { names (class -> name), separator (of the warning cell), lazy (thumbnails),
    // extra(e) (the page's own lines after the melanoma probability), metaForm(e) (null: none) }.
    const li = el("li", { class: "result", "data-path": e.name, "data-state": e.status });
    li.appendChild(thumb(e, page.lazy));
    const info = el("div", { class: "info" });
    info.appendChild(el("p", { class: "path" }, e.name));
    const error = e.localError || (e.row && e.row.error);
    if (e.status === "pending") {
      info.appendChild(el("p", { class: "pending" }, "classifying\u2026"));
    } else if (error) {
      info.appendChild(el("p", { class: "error" }, "Could not classify: " + error));
    } else {
      li.setAttribute("data-top1", e.row.top1_class);
      info.appendChild(bars(e.row, page.names));
      if (e.row.mel_prob !== undefined) info.appendChild(el("p", { class: "melp" }, "melanoma probability " + e.row.mel_prob));
      for (const node of page.extra ? page.extra(e) : []) info.appendChild(node);
      const warnings = warningsOf(e, page.separator);
      for (const w of warnings || []) info.appendChild(el("p", { class: "warning", role: "note" }, "\u26A0 Warning: " + w));
      if (warnings) li.setAttribute("data-warning", "true");
      if (e.row.metadata === "used") info.appendChild(el("p", { class: "melp" }, "with the patient's age, sex and body site"));
      const form = page.metaForm ? page.metaForm(e) : null;
      if (form) info.appendChild(form);
    }
    li.appendChild(info);
    return li;
  }

  function metaForm(e, md, submit) {
    // Optional age, sex and body site for one image: md = { age: [min, max], sexes, sites (with the
    // site groups) }; submit(e, { age: the field's text, sex, site }) classifies it again with them.
    const box = el("details", { class: "meta" });
    if (e.meta) box.setAttribute("open", "");
    box.appendChild(el("summary", {}, "Age, sex, body site (optional)"));
    const age = el("input", { type: "number", min: String(md.age[0]), max: String(md.age[1]), step: "1", "aria-label": "age in years", placeholder: "age" });
    const sex = el("select", { "aria-label": "sex" });
    const site = el("select", { "aria-label": "body site" });
    sex.appendChild(el("option", { value: "" }, "sex unknown"));
    for (const v of md.sexes) sex.appendChild(el("option", { value: v }, v));
    site.appendChild(el("option", { value: "" }, "site unknown"));
    for (const v of md.sites) site.appendChild(el("option", { value: v }, v));
    if (e.meta) { age.value = e.meta.age === null ? "" : e.meta.age; sex.value = e.meta.sex || ""; site.value = e.meta.site || ""; }
    const go = el("button", { type: "button" }, "Classify again with them");
    go.addEventListener("click", () => submit(e, { age: age.value, sex: sex.value || null, site: site.value || null }));
    for (const node of [age, sex, site, go]) box.appendChild(node);
    return box;
  }

  // --- the CSV -----------------------------------------------------------------------------------------
  // skinclf/batch/results.py csv_cell, mirrored so the download matches predict's and the API's CSV:
  // backslashes doubled, a leading ' on text a spreadsheet would run as a formula (OWASP CSV
  // injection: = + - @ tab CR, also after leading quotes; numbers excepted), and every cell quoted.
  const FORMULA_START = /^'*[=+\-@\t\r]/;
  const NUMBER = /^-?[0-9]+(\.[0-9]+)?$/;
  function csvCell(v) {
    let text = String(v).replace(/\\/g, "\\\\");
    if (FORMULA_START.test(text) && !NUMBER.test(text)) text = "'" + text;
    return '"' + text.replace(/"/g, '""') + '"';
  }

  function csvText(header, rows) {
    // The file: the header, then the rows sorted by path (predict's order), '\n' lines.
    rows = rows.slice().sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    return [header, ...rows].map((r) => r.map(csvCell).join(",")).join("\n") + "\n";
  }

  function csvRow(e, header, classified) {
    // One entry's cells: a classified image's as predict formatted them (a `metadata` cell the row
    // lacks: "missing", as predict --metadata writes it); otherwise its path and its error on one line.
    if (classified) {
      return header.map((c) => (c === "metadata" && e.row.metadata === undefined ? (e.row.error ? "" : "missing")
                                : e.row[c] === undefined ? "" : e.row[c]));
    }
    return header.map((c) => (c === "path" ? e.name : c === "error" ? (e.localError || "not classified").split(/\s+/).join(" ") : ""));
  }

  function download(text) {
    const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    const a = el("a", { href: url, download: "results.csv" });
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // --- choosing and dropping images --------------------------------------------------------------------

  function fromInput(input, folder, page) {
    const items = [];
    for (const f of input.files) {
      let name = folder && f.webkitRelativePath ? f.webkitRelativePath : f.name;
      if (folder) {
        name = name.split("/").slice(1).join("/");  // relative to the chosen folder, as skinclf predict DIR writes it
        if (!page.wanted(name)) continue;
      }
      items.push({ file: f, name });
    }
    input.value = "";
    page.add(items);
  }

  function readEntries(reader) { return new Promise((resolve, reject) => reader.readEntries(resolve, reject)); }

  async function dropped(dt, page) {
    const items = [];
    const entries = Array.from(dt.items || []).map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null));
    if (entries.length && entries.every((x) => x)) {
      for (const entry of entries) {
        if (entry.isDirectory) {
          await walkDir(entry, "", items, page);   // paths relative to the dropped folder
        } else {
          const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
          items.push({ file, name: file.name });
        }
      }
    } else {
      for (const f of dt.files) items.push({ file: f, name: f.name });
    }
    page.add(items);
  }

  async function walkDir(dir, prefix, out, page) {
    const reader = dir.createReader();
    for (let batch = await readEntries(reader); batch.length; batch = await readEntries(reader)) {
      for (const child of batch) {
        const rel = prefix + child.name;
        if (child.isDirectory) {
          if (!child.name.startsWith(".")) await walkDir(child, rel + "/", out, page);
        } else if (page.wanted(rel)) {
          out.push({ file: await new Promise((resolve, reject) => child.file(resolve, reject)), name: rel });
        }
      }
    }
  }

  function bind(page) {
    // The controls: page = { wanted(relPath) (a folder's files kept), add(items), render(), csvText(), clear() }.
    $("pick-files").addEventListener("click", () => $("files").click());
    $("pick-folder").addEventListener("click", () => $("folder").click());
    $("files").addEventListener("change", (ev) => fromInput(ev.target, false, page));
    $("folder").addEventListener("change", (ev) => fromInput(ev.target, true, page));
    $("sort").addEventListener("change", () => page.render());
    $("download").addEventListener("click", () => download(page.csvText()));
    $("clear").addEventListener("click", () => page.clear());
    const drop = $("drop");
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
    drop.addEventListener("drop", (ev) => { ev.preventDefault(); dropped(ev.dataTransfer, page).catch((err) => setStatus("Could not read the dropped items: " + err.message)); });
    // Files dropped outside the zone must not make the browser navigate away from the results.
    window.addEventListener("dragover", (ev) => ev.preventDefault());
    window.addEventListener("drop", (ev) => ev.preventDefault());
  }

  return { $, el, setStatus, count, showModel, warningsOf, tally, summary, enableActions, melProb, sorted, thumb, bars, renderEntry, metaForm,
           csvCell, csvText, csvRow, download, bind };
})();
