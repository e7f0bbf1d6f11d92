// underway dashboard: enhancements only. Every page and action works without this file.
// - the overview refreshes itself every few seconds (pausable; skipped in hidden tabs)
// - the throughput chart gets a styled tooltip and column highlight on hover
// - forms with data-confirm ask before they post
// - times show their local equivalent on hover
(function () {
  "use strict";

  function confirmForms(root) {
    root.querySelectorAll("form[data-confirm]").forEach(function (form) {
      if (form.dataset.bound) return;
      form.dataset.bound = "1";
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm)) event.preventDefault();
      });
    });
  }

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (isNaN(when)) return;
      el.title = when.toLocaleString() + " (local) \u00b7 " + el.title;
    });
  }

  function chartTooltips(root) {
    root.querySelectorAll("[data-chart]").forEach(function (figure) {
      var tip = document.createElement("div");
      tip.className = "tooltip";
      tip.hidden = true;
      figure.appendChild(tip);
      figure.querySelectorAll(".col").forEach(function (col) {
        var title = col.querySelector("title");
        if (title) title.remove(); // the styled tooltip replaces the native one
        col.addEventListener("mouseenter", function () {
          var box = col.querySelector(".hit").getBoundingClientRect();
          var frame = figure.getBoundingClientRect();
          tip.textContent = col.dataset.tip;
          tip.hidden = false;
          var left = box.left - frame.left + box.width / 2;
          left = Math.max(tip.offsetWidth / 2, Math.min(frame.width - tip.offsetWidth / 2, left));
          tip.style.left = left + "px";
          tip.style.top = box.top - frame.top + 4 + "px";
          col.classList.add("is-hover");
        });
        col.addEventListener("mouseleave", function () {
          tip.hidden = true;
          col.classList.remove("is-hover");
        });
      });
    });
  }

  function enhance(root) {
    confirmForms(root);
    localTimes(root);
    chartTooltips(root);
  }

  function autoRefresh() {
    var area = document.querySelector("[data-refresh]");
    var status = document.querySelector("[data-refresh-status]");
    if (!area || !status || !window.fetch || !window.DOMParser) return;
    var every = parseInt(area.dataset.refreshMs, 10) || 5000;
    var running = "Refreshing every " + (every / 1000).toLocaleString() + " s";
    var key = "underway.autorefresh";
    var on = window.localStorage.getItem(key) !== "off";
    var label = document.createElement("span");
    var toggle = document.createElement("button");
    toggle.type = "button";
    toggle.className = "btn btn-sm";
    status.appendChild(label);
    status.appendChild(toggle);

    function show(text) {
      label.textContent = text;
      toggle.textContent = on ? "Pause auto-refresh" : "Auto-refresh";
    }
    show(on ? running : "Auto-refresh paused");
    toggle.addEventListener("click", function () {
      on = !on;
      window.localStorage.setItem(key, on ? "on" : "off");
      show(on ? running : "Auto-refresh paused");
    });

    var busy = false;
    function busyHere() {
      var active = document.activeElement;
      return area.contains(active) && active !== document.body;
    }
    window.setInterval(function () {
      if (!on || busy || document.hidden || busyHere()) return;
      busy = true;
      fetch(window.location.href, { credentials: "same-origin", headers: { "X-Refresh": "1" } })
        .then(function (response) {
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.text();
        })
        .then(function (html) {
          var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("[data-refresh]");
          if (fresh) {
            area.innerHTML = fresh.innerHTML;
            enhance(area);
            show("Updated " + new Date().toLocaleTimeString());
          }
        })
        .catch(function (error) {
          show("Refresh failed (" + error.message + "); retrying");
        })
        .then(function () {
          busy = false;
        });
    }, every);
  }

  document.addEventListener("DOMContentLoaded", function () {
    enhance(document);
    autoRefresh();
  });
})();
