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

  window.addEventListener("pagehide", function () {
    leaving = true;
  });

  document.addEventListener("htmx:wsOpen", function (event) {
    lost.delete(event.detail.elt);
    stopped.delete(event.detail.elt);
    render();
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
