// A migration report's convergence chart (uPlot), kept live while the migration runs.
// Data: the page's <script type="application/json" id="chart-data"> (reports.chart_data), then, on
// every progress push of the VM's socket (/ws/vms/<id>/, the General tab's), a re-read of the report's
// JSON; polling every second if the socket cannot be opened. No inline script (CSP).
(function () {
  "use strict";
  const MiB = 1024 * 1024;
  const MB = 1000 * 1000;

  function columns(chart) {
    const s = chart.series;
    return [
      s.round,
      s.bytes_remaining.map((v) => v / MiB),
      s.dirty_rate_bytes_s.map((v) => v / MB),
      s.throughput_bytes_s.map((v) => v / MB),
    ];
  }

  function size(element) {
    return { width: Math.max(element.clientWidth, 320), height: 320 };
  }

  function makePlot(element, chart) {
    const opts = {
      ...size(element),
      scales: { x: { time: false }, mib: { range: (u, min, max) => [0, Math.max(max, 1)] }, rate: { range: (u, min, max) => [0, Math.max(max, 1)] } },
      axes: [
        { label: "Round", incrs: [1, 2, 5, 10, 20, 50, 100] },
        { scale: "mib", label: "MiB left", size: 60 },
        { scale: "rate", label: "MB/s", side: 1, size: 60, grid: { show: false } },
      ],
      series: [
        { label: "Round" },
        { label: "Bytes left (MiB)", scale: "mib", stroke: "#2f6fb3", width: 2, fill: "rgba(47,111,179,0.08)", points: { show: true, size: 6 } },
        { label: "Dirty rate (MB/s)", scale: "rate", stroke: "#b3261e", width: 2, dash: [6, 4], points: { show: true } },
        { label: "Throughput (MB/s)", scale: "rate", stroke: "#2e8b57", width: 2, points: { show: true } },
      ],
    };
    return new uPlot(opts, columns(chart), element);
  }

  function formatBytes(value) {
    const units = ["bytes", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
    return i === 0 ? `${value} bytes` : `${value.toFixed(1)} ${units[i]}`;
  }

  function showStats(root, stats) {
    const text = {
      bytes_sent: formatBytes(stats.bytes_sent),
      disk_bytes_sent: formatBytes(stats.disk_bytes_sent || 0),
      disk_bytes_remaining: formatBytes(stats.disk_bytes_remaining || 0),
      rounds: String(stats.rounds),
      state_label: stats.state_label,
      downtime_ms: stats.downtime_ms === null ? "—" : `${stats.downtime_ms} ms`,
    };
    for (const [name, value] of Object.entries(text)) {
      const element = root.querySelector(`[data-stat="${name}"]`);
      if (element && name !== "state_label") element.textContent = value;
    }
  }

  function start() {
    const root = document.getElementById("migration-report");
    const element = document.getElementById("convergence-chart");
    const source = document.getElementById("chart-data");
    if (!root || !element || !source || typeof uPlot === "undefined") return;
    let chart = JSON.parse(source.textContent);
    let plot = null;
    let updates = 0;

    function draw() {
      const rounds = chart.series.round.length;
      element.dataset.rounds = String(rounds);
      document.getElementById("chart-empty").hidden = rounds > 0;
      if (rounds === 0) return;
      if (plot === null) plot = makePlot(element, chart);
      else plot.setData(columns(chart));
    }
    draw();
    window.addEventListener("resize", () => { if (plot) plot.setSize(size(element)); });
    if (root.dataset.active !== "true") return;

    let inFlight = false;
    let again = false;
    let socket = null;
    let poller = null;

    async function refresh() {
      if (inFlight) { again = true; return; }
      inFlight = true;
      try {
        const response = await fetch(root.dataset.url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
        if (response.ok) {
          chart = await response.json();
          updates += 1;
          element.dataset.updates = String(updates);
          draw();
          showStats(root, chart.stats);
          if (!chart.active) {
            if (socket) socket.close();
            if (poller) clearInterval(poller);
            window.location.reload(); // the final timeline, phase times and outcome
            return;
          }
        }
      } finally {
        inFlight = false;
        if (again) { again = false; refresh(); }
      }
    }

    function poll() { if (!poller) poller = setInterval(refresh, 1000); }

    if (root.dataset.vm && "WebSocket" in window) {
      const scheme = window.location.protocol === "https:" ? "wss" : "ws";
      socket = new WebSocket(`${scheme}://${window.location.host}/ws/vms/${root.dataset.vm}/`);
      socket.addEventListener("message", refresh);
      socket.addEventListener("close", () => { if (chart.active) poll(); });
      socket.addEventListener("error", poll);
    } else {
      poll();
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
