// cellwatch fleet page: keep the page's live part current without reloading.
// Every REFRESH ms it fetches the same URL with ?fragment=1 (server-rendered,
// escaped HTML) and swaps it in. When the hub does not answer (restarting,
// network) it says so and keeps trying; the page recovers by itself.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var conn = document.getElementById("conn");
  var updated = document.getElementById("updated");
  if (!live || !window.fetch) {
    return;
  }
  var period = Number(document.body.getAttribute("data-refresh-ms")) || 1000;
  var url = new URL(window.location.href);
  url.searchParams.set("fragment", "1");
  var last = null;
  var failingSince = null;

  function stamp() {
    var d = new Date();
    return d.toISOString().slice(0, 19).replace("T", " ") + " UTC";
  }

  function ok(html) {
    if (html !== last) {
      live.innerHTML = html;
      last = html;
    }
    failingSince = null;
    conn.hidden = true;
    conn.textContent = "";
    document.body.classList.remove("disconnected");
    updated.textContent = stamp();
  }

  function failed(reason) {
    if (failingSince === null) {
      failingSince = stamp();
    }
    conn.hidden = false;
    conn.textContent = "hub unreachable since " + failingSince + " (" + reason + "): retrying";
    document.body.classList.add("disconnected");
  }

  function poll() {
    var controller = new AbortController();
    var timer = setTimeout(function () { controller.abort(); }, Math.max(period * 4, 4000));
    fetch(url.toString(), { cache: "no-store", credentials: "same-origin", signal: controller.signal })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(ok, function (err) {
        failed(err && err.name === "AbortError" ? "no answer" : (err && err.message) || "error");
      })
      .then(function () {
        clearTimeout(timer);
        setTimeout(poll, period);
      });
  }

  setTimeout(poll, period);
})();
