// Console behaviour kept out of the HTML: the Content-Security-Policy allows no inline script or eval.
//
// 1. Live progress sockets (htmx ws extension): a socket that drops shows "Connection lost,
//    reconnecting…" until it is open again; reconnect attempts come every 0.5-3 s (the extension's
//    default backs off to about a minute), and the server sends the current state on every connect.
// 2. [data-empty-on-click="<selector>"]: a click empties that element (the migrate dialog's Close).
// 3. Migration policy forms: changing a custom value (max downtime, cap, auto-converge...) picks the
//    Custom preset, since a named preset is taken whole and the values apply only with Custom.
// 4. The evacuation (or return) plan: Start waits for a choice on each guest that may not converge
//    (exclude it, or start it anyway); ticking one enables Start at once, without Update plan (the
//    server checks the choices again when it starts).
// 5. Resync: a live socket's element names the page's regions it keeps true (data-resync="#a,#b").
//    When the socket opens AGAIN (it dropped: every push meanwhile is lost), and when a pushed frame's
//    version skips one (<!--push:<migration>:<version>-->, progress.push_mark: the channel layer
//    dropped a message), the page re-fetches those regions over HTTP with its own session.
// 6. A link probe from the VM's host ended (a pushed #link-probed): an open migrate dialog waiting for
//    it fetches its forecasts at once.
(function () {
  "use strict";

  var RECONNECT_CODES = [1006, 1011, 1012, 1013]; // the extension reconnects after these only
  var lost = new Set();
  var stopped = new Set();
  var leaving = false;

  htmx.config.wsReconnectDelay = function (retryCount) {
    var ceiling = Math.min(500 * Math.pow(2, retryCount), 3000);
    return ceiling / 2 + (Math.random() * ceiling) / 2;
  };

  function render() {
    var status = document.getElementById("connection-status");
    if (!status) {
      return;
    }
    lost.forEach(function (elt) {
      if (!document.body.contains(elt)) {
        lost.delete(elt);
      }
    });
    stopped.forEach(function (elt) {
      if (!document.body.contains(elt)) {
        stopped.delete(elt);
      }
    });
    if (lost.size > 0) {
      status.textContent = "Connection lost, reconnecting… What this page shows may be out of date.";
      status.hidden = false;
    } else if (stopped.size > 0) {
      status.textContent = "Live updates stopped. Reload the page to see the current state.";
      status.hidden = false;
    } else {
      status.textContent = "";
      status.hidden = true;
    }
  }

  var opened = new WeakSet(); // socket elements that have been open once
  var versions = new WeakMap(); // socket element -> {migration id: last version seen}
  var PUSH_MARK = /<!--push:(\d+):(\d+)-->/g;

  function resync(elt) {
    (elt.getAttribute("data-resync") || "").split(",").forEach(function (selector) {
      selector = selector.trim();
      if (selector && document.querySelector(selector)) {
        htmx.ajax("GET", window.location.href, { target: selector, select: selector, swap: "outerHTML" });
      }
    });
  }

  document.addEventListener("htmx:wsBeforeMessage", function (event) {
    var elt = event.detail.elt;
    var message = event.detail.message;
    if (!elt || typeof message !== "string") {
      return;
    }
    var seen = versions.get(elt);
    var first = seen === undefined; // the socket's first frame: the state now, a baseline
    if (first) {
      seen = {};
      versions.set(elt, seen);
    }
    if (message.indexOf("<!--push:") < 0) {
      return;
    }
    var gap = false;
    var match;
    PUSH_MARK.lastIndex = 0;
    while ((match = PUSH_MARK.exec(message)) !== null) {
      var version = Number(match[2]);
      var last = seen[match[1]];
      // A migration first met in a push (not in the first frame) starts at version 1.
      if (!first && version > (last === undefined ? 0 : last) + 1) {
        gap = true;
      }
      seen[match[1]] = last === undefined ? version : Math.max(last, version);
    }
    if (gap) {
      elt.setAttribute("data-resynced", String(Number(elt.getAttribute("data-resynced") || 0) + 1));
      resync(elt);
    }
  });

  // 5. Never backwards: the phases panel carries its migration's version (data-version, as read when it
  //    was drawn). A frame or an htmx answer drawn before what the page shows (a push overtaken by
  //    Refresh Data, or the other way round) does not replace it.
  function staleness(incoming) {
    var current = document.getElementById("migration-phases");
    if (!incoming || !current || !current.dataset.version || !incoming.dataset.version) {
      return false;
    }
    return (
      incoming.dataset.migration === current.dataset.migration &&
      Number(incoming.dataset.version) < Number(current.dataset.version)
    );
  }

  function parse(html) {
    var template = document.createElement("template");
    template.innerHTML = html;
    return template;
  }

  document.addEventListener("htmx:wsBeforeMessage", function (event) {
    var message = event.detail.message;
    if (typeof message !== "string" || message.indexOf('id="migration-phases"') < 0) {
      return;
    }
    if (staleness(parse(message).content.querySelector("#migration-phases"))) {
      event.preventDefault(); // older than the page: the whole frame is
    }
  });

  // 6. A link probe from this VM's host ended (a pushed #link-probed): an open migrate dialog that is
  //    waiting for it asks for its forecasts now, not at its next poll (its 3 s poll is the fallback).
  document.addEventListener("htmx:wsAfterMessage", function (event) {
    var message = event.detail.message;
    if (typeof message !== "string" || message.indexOf('id="link-probed"') < 0) {
      return;
    }
    var loader = document.getElementById("forecast-loader");
    if (loader) {
      htmx.trigger(loader, "linkprobed");
    }
  });

  document.addEventListener("htmx:beforeSwap", function (event) {
    var text = event.detail.serverResponse;
    if (typeof text !== "string" || text.indexOf('id="migration-phases"') < 0) {
      return;
    }
    var template = parse(text);
    var incoming = template.content.querySelector("#migration-phases");
    if (!staleness(incoming)) {
      return;
    }
    var kept = document.getElementById("migration-phases").cloneNode(true);
    if (incoming.hasAttribute("hx-swap-oob")) {
      kept.setAttribute("hx-swap-oob", incoming.getAttribute("hx-swap-oob"));
    } else {
      kept.removeAttribute("hx-swap-oob");
    }
    incoming.replaceWith(kept);
    event.detail.serverResponse = template.innerHTML;
  });

  window.addEventListener("pagehide", function () {
    leaving = true;
  });

  document.addEventListener("htmx:wsOpen", function (event) {
    var elt = event.detail.elt;
    lost.delete(elt);
    stopped.delete(elt);
    render();
    if (opened.has(elt)) {
      versions.delete(elt); // the new socket's first frame is the new baseline
      elt.setAttribute("data-resynced", String(Number(elt.getAttribute("data-resynced") || 0) + 1));
      resync(elt);
    }
    opened.add(elt);
  });

  document.addEventListener("htmx:wsClose", function (event) {
    var code = event.detail.event ? event.detail.event.code : 1006;
    if (leaving || code === 1001) {
      return; // the page itself is going away
    }
    if (RECONNECT_CODES.indexOf(code) >= 0) {
      lost.add(event.detail.elt);
    } else {
      stopped.add(event.detail.elt);
    }
    render();
  });

  document.addEventListener("click", function (event) {
    var trigger = event.target.closest("[data-empty-on-click]");
    if (!trigger) {
      return;
    }
    var target = document.querySelector(trigger.getAttribute("data-empty-on-click"));
    if (target) {
      event.preventDefault();
      target.replaceChildren();
    }
  });

  document.addEventListener("change", function (event) {
    var field = event.target;
    var custom = field.closest && field.closest("fieldset.policy-custom");
    if (!custom || !field.form) {
      return;
    }
    var preset = field.form.querySelector('input[name="preset"][value="custom"]');
    if (preset) {
      preset.checked = true;
    }
  });

  document.addEventListener("change", function (event) {
    var form = event.target.closest && event.target.closest("form[data-start-when-chosen]");
    var start = form && form.querySelector("#start-evacuation[data-needs-choice]");
    if (!start) {
      return;
    }
    var rows = form.querySelectorAll("tr[data-warning-for]");
    start.disabled = !Array.prototype.every.call(rows, function (row) {
      return row.querySelector('input[data-field="confirm"]:checked, input[data-field="exclude"]:checked');
    });
  });
})();
