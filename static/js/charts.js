// Charts of the database page. Data comes from a json_script element (no inline script: the
// Content-Security-Policy allows scripts from this site only).
(function () {
  "use strict";
  function draw() {
    var el = document.getElementById("bv-chart-data");
    if (!el || typeof Chart === "undefined") { return; }
    var data = JSON.parse(el.textContent);
    var colors = { logical: "#0a3069", base: "#116329" };
    function datasets(metric) {
      return Object.keys(data.series).map(function (kind) {
        return {
          label: kind, borderColor: colors[kind] || "#57606a", backgroundColor: colors[kind] || "#57606a",
          data: data.labels.map(function (day) { var v = data.series[kind][metric][day]; return v === undefined ? null : v; }),
          spanGaps: true
        };
      });
    }
    function bytes(v) {
      var units = ["B", "kB", "MB", "GB", "TB"], i = 0;
      while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
      return (i ? v.toFixed(1) : v) + " " + units[i];
    }
    var common = { responsive: true, animation: false, plugins: { legend: { position: "bottom" } } };
    new Chart(document.getElementById("bv-size-chart"), {
      type: "line", data: { labels: data.labels, datasets: datasets("size") },
      options: Object.assign({}, common, {
        scales: { y: { beginAtZero: true, title: { display: true, text: "archive size" }, ticks: { callback: bytes } } }
      })
    });
    new Chart(document.getElementById("bv-duration-chart"), {
      type: "bar", data: { labels: data.labels, datasets: datasets("seconds") },
      options: Object.assign({}, common, { scales: { y: { beginAtZero: true, title: { display: true, text: "seconds" } } } })
    });
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", draw); } else { draw(); }
})();
