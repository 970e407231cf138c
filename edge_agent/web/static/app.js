/* Farmer page: take a photo, shrink it on the phone, send it, show the diagnosis and advice.
   No framework, no build step. Photos waiting to be sent live in IndexedDB so a dropped link
   never loses them; the last diagnoses live in localStorage. A service worker (/sw.js) keeps the
   page itself, so it opens with no board in reach; photos taken then wait in the queue. */
"use strict";
(function () {
  var T = window.I18N || {};
  var LANGS = Object.keys(T);
  var MAX_SIDE = 1024;
  var HISTORY_MAX = 10;
  var RETRY_MIN = 5000, RETRY_MAX = 120000;
  var $ = function (id) { return document.getElementById(id); };
  var state = { lang: "en", current: null, busy: false, retryDelay: RETRY_MIN, retryTimer: 0, preview: "", sending: "" };

  // ---- small helpers ---------------------------------------------------------------------------------
  var store = {
    get: function (k, d) { try { var v = localStorage.getItem(k); return v === null ? d : JSON.parse(v); } catch (e) { return d; } },
    set: function (k, v) { try { localStorage.setItem(k, JSON.stringify(v)); } catch (e) { /* full or private mode */ } }
  };
  function t(key) { var p = T[state.lang] || {}; return p[key] !== undefined ? p[key] : ((T.en || {})[key] || key); }
  function pct(x) { return Math.round((x || 0) * 100) + "%"; }
  function show(id, on) { $(id).hidden = !on; }
  function fill(list, items) {
    list.textContent = "";
    items.forEach(function (text) { var li = document.createElement("li"); li.textContent = text; list.appendChild(li); });
  }
  function status(key, progress) {
    show("status", !!key);
    $("status-text").textContent = key ? t(key) : "";
    $("status-text").className = key === "badPhoto" ? "error" : "";
    var bar = $("progress");
    if (progress === undefined || progress === null) { bar.removeAttribute("value"); } else { bar.value = progress; }
    bar.hidden = key === "badPhoto" || key === "saved" || key === "busy" || key === "needCode";
  }
  function token() { return store.get("token", ""); }
  function authHeader(xhr) { if (token()) { xhr.setRequestHeader("Authorization", "Bearer " + token()); } }
  // one random key per photo, kept with it until it is answered: a retry is then stored once by the agent
  function newKey() {
    var bytes = new Uint8Array(16), out = "";
    (window.crypto || window.msCrypto).getRandomValues(bytes); // available on plain http too
    for (var i = 0; i < bytes.length; i++) { out += (bytes[i] + 256).toString(16).slice(1); }
    return out;
  }

  // ---- language --------------------------------------------------------------------------------------
  function pickLang() {
    var saved = store.get("lang", "");
    if (T[saved]) { return saved; }
    var wanted = (navigator.languages || [navigator.language || "en"]);
    for (var i = 0; i < wanted.length; i++) {
      var code = String(wanted[i] || "").toLowerCase().split("-")[0];
      if (T[code]) { return code; }
    }
    return "en";
  }
  function applyLang() {
    document.documentElement.lang = state.lang;
    document.title = t("title");
    Array.prototype.forEach.call(document.querySelectorAll("[data-t]"), function (el) { el.textContent = t(el.getAttribute("data-t")); });
    $("lang").value = state.lang;
    var crop = $("crop"), chosen = crop.value || store.get("crop", "");
    crop.textContent = "";
    var opts = [["", t("cropUnknown")]];
    var names = t("crops") || {};
    Object.keys(names).forEach(function (id) { opts.push([id, names[id]]); });
    opts.forEach(function (o) { var el = document.createElement("option"); el.value = o[0]; el.textContent = o[1]; crop.appendChild(el); });
    crop.value = chosen;
    $("take").firstElementChild.textContent = t(state.current ? "another" : "takePhoto");
    renderHistory();
    updateQueue();
  }

  // ---- photos waiting to be sent (IndexedDB, memory fallback) ------------------------------------------
  var memoryQueue = [];
  var dbPromise = new Promise(function (resolve) {
    if (!window.indexedDB) { resolve(null); return; }
    var req;
    try { req = indexedDB.open("leaf-doctor", 1); } catch (e) { resolve(null); return; }
    req.onupgradeneeded = function () { req.result.createObjectStore("queue", { keyPath: "id" }); };
    req.onsuccess = function () { resolve(req.result); };
    req.onerror = function () { resolve(null); };
  });
  function tx(mode, fn) {
    return dbPromise.then(function (db) {
      if (!db) { return fn(null); }
      return new Promise(function (resolve, reject) {
        var s = db.transaction("queue", mode).objectStore("queue"), out = fn(s);
        s.transaction.oncomplete = function () { resolve(out && out.result !== undefined ? out.result : out); };
        s.transaction.onerror = function () { reject(s.transaction.error); };
      });
    });
  }
  function queueAdd(rec) { return tx("readwrite", function (s) { if (!s) { memoryQueue.push(rec); return null; } return s.put(rec); }); }
  function queueDel(id) {
    return tx("readwrite", function (s) {
      if (!s) { memoryQueue = memoryQueue.filter(function (r) { return r.id !== id; }); return null; }
      return s.delete(id);
    });
  }
  function queueAll() { return tx("readonly", function (s) { return s ? s.getAll() : memoryQueue.slice(); }); }
  function updateQueue() {
    return queueAll().then(function (all) {
      all = (all || []).sort(function (a, b) { return a.created - b.created; });
      show("queue", all.length > 0);
      $("queue-text").textContent = t("waiting").replace("{n}", all.length);
      var list = $("queue-list");
      list.textContent = "";
      all.forEach(function (rec) { // one line per photo: when it was taken and what is happening to it
        var li = document.createElement("li"), sending = rec.id === state.sending;
        li.textContent = new Date(rec.created).toLocaleTimeString(state.lang, { hour: "2-digit", minute: "2-digit" }) +
          " · " + t(sending ? "queueSending" : "queueWaiting");
        li.setAttribute("data-state", sending ? "sending" : "waiting");
        list.appendChild(li);
      });
      return all;
    });
  }

  // ---- shrink the photo on the phone -----------------------------------------------------------------
  function loadBitmap(file) {
    if (window.createImageBitmap) {
      return createImageBitmap(file, { imageOrientation: "from-image" }).catch(function () { return loadImage(file); });
    }
    return loadImage(file);
  }
  function loadImage(file) {
    return new Promise(function (resolve, reject) {
      var img = new Image(), url = URL.createObjectURL(file);
      img.onload = function () { URL.revokeObjectURL(url); resolve(img); };
      img.onerror = function () { URL.revokeObjectURL(url); reject(new Error("decode")); };
      img.src = url;
    });
  }
  function downscale(file) {
    return loadBitmap(file).then(function (img) {
      var w = img.width, h = img.height, k = Math.min(1, MAX_SIDE / Math.max(w, h));
      var canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(w * k));
      canvas.height = Math.max(1, Math.round(h * k));
      canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
      if (img.close) { img.close(); }
      return new Promise(function (resolve) { canvas.toBlob(function (b) { resolve(b || file); }, "image/jpeg", 0.85); });
    }).catch(function () { return file; }); // the server decides whether it can read it
  }

  // ---- talking to the agent --------------------------------------------------------------------------
  function request(method, url, body, onProgress, key) {
    return new Promise(function (resolve, reject) {
      var xhr = new XMLHttpRequest();
      xhr.open(method, url);
      xhr.timeout = 90000;
      authHeader(xhr);
      if (key) { xhr.setRequestHeader("Idempotency-Key", key); }
      if (onProgress && xhr.upload) {
        xhr.upload.onprogress = function (e) { if (e.lengthComputable) { onProgress(Math.round(100 * e.loaded / e.total)); } };
        xhr.upload.onload = function () { onProgress(100); };
      }
      xhr.onload = function () {
        var data = null;
        try { data = JSON.parse(xhr.responseText); } catch (e) { data = null; }
        resolve({ status: xhr.status, data: data, retryAfter: Number(xhr.getResponseHeader("Retry-After")) || 0 });
      };
      xhr.onerror = xhr.ontimeout = xhr.onabort = function () { reject(new Error("network")); };
      xhr.send(body || null);
    });
  }
  function send(rec) {
    var form = new FormData();
    form.append("image", rec.blob, "photo.jpg");
    form.append("lang", rec.lang);
    if (rec.crop) { form.append("crop", rec.crop); }
    status("uploading", 0);
    return request("POST", "/v1/diagnose?lang=" + encodeURIComponent(rec.lang), form, function (p) {
      if (p >= 100) { status("analysing"); } else { status("uploading", p); }
    }, rec.key || rec.id);
  }
  function poll(url, tries) {
    status("pending");
    return new Promise(function (resolve) { setTimeout(resolve, 2000); }).then(function () {
      return request("GET", url + "?lang=" + encodeURIComponent(state.lang));
    }).then(function (r) {
      if (r.status === 202 && tries > 0) { return poll(url, tries - 1); }
      return r;
    });
  }
  function outcome(rec, r) {
    var transient = r.status === 0 || r.status === 408 || r.status === 409 || r.status === 429 || r.status >= 500;
    if (r.status === 200 && r.data) { return queueDel(rec.id).then(function () { render(r.data, rec.preview); remember(r.data); status(null); return true; }); }
    if (r.status === 202 && r.data) {
      return queueDel(rec.id).then(function () { return poll(r.data.location, 30); }).then(function (p) { return outcome({ id: "" }, p); });
    }
    if (r.status === 401) { show("auth", true); status("needCode"); return Promise.resolve(false); }
    if (transient) { status(r.status === 0 ? "saved" : "busy"); scheduleRetry(r.retryAfter); return Promise.resolve(false); }
    return queueDel(rec.id).then(function () { status("badPhoto"); return true; });
  }
  function sendOne(rec) {
    if (!rec.preview && rec.blob) {
      if (state.preview) { URL.revokeObjectURL(state.preview); }
      rec.preview = state.preview = URL.createObjectURL(rec.blob);
    }
    state.sending = rec.id;
    updateQueue();
    return send(rec).then(function (r) { state.sending = ""; return outcome(rec, r); }, function () {
      state.sending = ""; status("saved"); scheduleRetry(0); return false;
    });
  }
  function flush() {
    if (state.busy) { return Promise.resolve(); }
    state.busy = true;
    $("take").classList.add("busy");
    clearTimeout(state.retryTimer);
    return queueAll().then(function (all) {
      all = (all || []).sort(function (a, b) { return a.created - b.created; });
      var chain = Promise.resolve(true);
      all.forEach(function (rec) { chain = chain.then(function (ok) { return ok ? sendOne(rec) : false; }); });
      return chain;
    }).then(function (ok) {
      if (ok) { state.retryDelay = RETRY_MIN; }
      return ok;
    }).catch(function () { scheduleRetry(0); return false; }).then(function (ok) {
      state.busy = false;
      $("take").classList.remove("busy");
      return updateQueue().then(function (left) {
        if (ok && left.length) { setTimeout(flush, 0); } // photos taken while this round was sending
      });
    });
  }
  function scheduleRetry(afterS) {
    clearTimeout(state.retryTimer);
    var delay = Math.max(state.retryDelay, (afterS || 0) * 1000);
    state.retryDelay = Math.min(RETRY_MAX, state.retryDelay * 2);
    state.retryTimer = setTimeout(flush, delay);
  }

  // ---- showing the answer ----------------------------------------------------------------------------
  // the four answer bands: a diagnosis; "not sure" (the top two, retake advice); "not a crop I know" (the
  // crops it knows); "retake" (the photo failed a quality check: the hint says how to take a better one)
  function bandOf(res) { return res.band || (res.diagnosis.recognised ? "diagnosis" : "unknown_plant"); }
  function render(res, preview) {
    state.current = res;
    store.set("last", res);
    var d = res.diagnosis, band = bandOf(res), note = "";
    var alts = band === "unsure" ? res.alternatives.slice(0, 2) : res.alternatives;
    $("diag-name").textContent = d.name;
    $("diag-crop").textContent = d.crop_name || "";
    if (band === "unsure") { $("diag-name").textContent = t("unsureTitle"); $("diag-crop").textContent = ""; note = t("unsure"); }
    if (band === "unknown_plant") {
      $("diag-name").textContent = t("unknownTitle");
      var known = (res.known_crops || []).map(function (c) { return c.crop_name; });
      note = (known.length ? t("knownCrops").replace("{crops}", known.join(", ")) + " " : "") + t("unknownAdvice");
    }
    if (band === "retake") { note = res.retake ? res.retake.hint : t("unsure"); }
    $("diag-conf").textContent = pct(d.confidence);
    show("conf-line", band === "diagnosis" && d.recognised); // a score for "not a leaf" would only confuse
    show("unsure", band === "diagnosis" && d.recognised && d.confidence < 0.5);
    $("band-note").textContent = note;
    show("band-note", !!note);
    show("advice-box", band === "diagnosis" && !!res.advice);
    show("alt-box", (band === "diagnosis" || band === "unsure") && alts.length > 0);
    $("alt-title").textContent = t(band === "unsure" ? "couldBe" : "alternatives");
    $("advice-desc").textContent = res.advice ? res.advice.description : "";
    fill($("advice-now"), res.advice ? res.advice.now : []);
    fill($("advice-prevention"), res.advice ? res.advice.prevention : []);
    fill($("alternatives"), alts.map(function (a) {
      return a.name + (a.crop_name && a.name.indexOf(a.crop_name) < 0 ? " (" + a.crop_name + ")" : "") + " – " + pct(a.confidence);
    }));
    if (preview) { $("preview").src = preview; }
    show("preview", !!$("preview").getAttribute("src"));
    $("disclaimer").textContent = res.disclaimer || t("disclaimer");
    $("result").className = band === "diagnosis" && d.recognised ? (d.healthy ? "healthy" : "sick") : band;
    $("result").setAttribute("data-label", d.label);
    $("result").setAttribute("data-band", band);
    $("result").setAttribute("data-lang", res.language);
    show("result", true);
    $("take").firstElementChild.textContent = t("another");
  }
  function remember(res) {
    var list = store.get("history", []).filter(function (h) { return h.id !== res.id; });
    var sure = bandOf(res) === "diagnosis";
    list.unshift({ id: res.id, when: Date.now(), label: res.diagnosis.label, name: historyName(res),
                   crop: sure ? res.diagnosis.crop_name || "" : "", confidence: sure ? res.diagnosis.confidence : null });
    store.set("history", list.slice(0, HISTORY_MAX));
    renderHistory();
  }
  function historyName(res) {
    var band = bandOf(res);
    if (band === "unsure") { return t("unsureTitle"); }
    return band === "unknown_plant" ? t("unknownTitle") : res.diagnosis.name;
  }
  function renameInHistory(res) {
    var list = store.get("history", []);
    list.forEach(function (h) {
      if (h.id === res.id) { h.name = historyName(res); h.crop = bandOf(res) === "diagnosis" ? res.diagnosis.crop_name || "" : ""; }
    });
    store.set("history", list);
    renderHistory();
  }
  function renderHistory() {
    var list = $("history-list"), items = store.get("history", []);
    list.textContent = "";
    if (!items.length) { var empty = document.createElement("li"); empty.textContent = t("noHistory"); list.appendChild(empty); return; }
    items.forEach(function (h) {
      var li = document.createElement("li"), btn = document.createElement("button");
      li.textContent = new Date(h.when).toLocaleDateString(state.lang) + " · " + h.name + (h.crop ? " · " + h.crop : "") +
        (typeof h.confidence === "number" ? " · " + pct(h.confidence) : "");
      btn.type = "button"; btn.textContent = t("show");
      btn.onclick = function () { refetch(h.id); };
      li.appendChild(btn);
      list.appendChild(li);
    });
  }
  function refetch(id) {
    return request("GET", "/v1/results/" + encodeURIComponent(id) + "?lang=" + encodeURIComponent(state.lang)).then(function (r) {
      if (r.status === 200 && r.data) { render(r.data); renameInHistory(r.data); }
    }, function () { /* offline: keep what is shown */ });
  }

  // ---- wiring ----------------------------------------------------------------------------------------
  function onPhoto() {
    var file = $("photo").files && $("photo").files[0];
    $("photo").value = "";
    if (!file) { return; }
    status("preparing");
    downscale(file).then(function (blob) {
      var rec = { id: String(Date.now()) + "-" + Math.random().toString(16).slice(2), created: Date.now(),
                  blob: blob, lang: state.lang, crop: $("crop").value, key: newKey() };
      return queueAdd({ id: rec.id, created: rec.created, blob: blob, lang: rec.lang, crop: rec.crop, key: rec.key }).then(function () {
        return updateQueue();
      }).then(function () {
        state.retryDelay = RETRY_MIN;
        return flush(); // sends the queue in order, this photo included
      });
    });
  }
  function init() {
    var hash = /[#&]token=([^&]+)/.exec(location.hash);
    if (hash) { store.set("token", decodeURIComponent(hash[1])); history.replaceState(null, "", location.pathname + location.search); }
    state.lang = pickLang();
    var sel = $("lang");
    LANGS.forEach(function (code) { var o = document.createElement("option"); o.value = code; o.textContent = T[code]._name; sel.appendChild(o); });
    sel.onchange = function () {
      state.lang = sel.value; store.set("lang", state.lang); applyLang();
      if (state.current) { refetch(state.current.id); }
    };
    $("crop").onchange = function () { store.set("crop", $("crop").value); };
    $("photo").onchange = onPhoto;
    $("retry").onclick = function () { state.retryDelay = RETRY_MIN; flush(); };
    $("save-token").onclick = function () { store.set("token", $("token").value.trim()); show("auth", false); flush(); };
    window.addEventListener("online", function () { state.retryDelay = RETRY_MIN; flush(); });
    // keep the page on the phone (secure contexts only: http://localhost, 127.0.0.1 or https; see docs/api.md)
    if ("serviceWorker" in navigator && window.isSecureContext) {
      navigator.serviceWorker.register("/sw.js", { scope: "/" }).catch(function () { /* the page still works online */ });
    }
    applyLang();
    var last = store.get("last", null);
    if (last && last.diagnosis) { render(last); }
    flush();
  }
  init();
})();
