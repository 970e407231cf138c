/* Service worker of the farmer page: keeps the page shell on the phone, so the page opens with no board in
   reach. Served by the agent at /sw.js (scope "/"), with VERSION replaced by a hash of the shell files: a
   changed page installs a new cache and drops the old one. Shell files are answered from the cache at once
   and refreshed from the board in the background (stale-while-revalidate): an unreachable board never makes
   the page wait. Photos and results (/v1/...) are not touched: the page itself queues photos in IndexedDB
   and sends them when the board answers. Needs a secure context: http://localhost, 127.0.0.1 or https. */
"use strict";
var VERSION = "__VERSION__";
var CACHE = "leaf-doctor-" + VERSION;
var SHELL = ["/", "/static/app.css", "/static/i18n.js", "/static/app.js", "/static/icon.svg",
             "/static/manifest.webmanifest", "/static/icon-192.png"];

self.addEventListener("install", function (e) {
  e.waitUntil(caches.open(CACHE).then(function (c) { return c.addAll(SHELL); }).then(function () { return self.skipWaiting(); }));
});

self.addEventListener("activate", function (e) {
  e.waitUntil(caches.keys().then(function (keys) {
    return Promise.all(keys.filter(function (k) { return k.indexOf("leaf-doctor-") === 0 && k !== CACHE; })
      .map(function (k) { return caches.delete(k); }));
  }).then(function () { return self.clients.claim(); }));
});

self.addEventListener("fetch", function (e) {
  var req = e.request, url = new URL(req.url);
  if (req.method !== "GET" || url.origin !== self.location.origin) { return; }
  var path = req.mode === "navigate" && url.pathname === "/" ? "/" : url.pathname;
  if (SHELL.indexOf(path) < 0) { return; } // the API and everything else: straight to the network
  e.respondWith(caches.open(CACHE).then(function (cache) {
    return cache.match(path).then(function (hit) {
      var fresh = fetch(req).then(function (res) {
        if (res.ok) { return cache.put(path, res.clone()).then(function () { return res; }); }
        return res;
      });
      if (hit) { e.waitUntil(fresh.catch(function () { return null; })); return hit; }
      return fresh;
    });
  }));
});
