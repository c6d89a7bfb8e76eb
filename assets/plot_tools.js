// HFPrune Studio page script (loaded in <head> by hfprune_ui/plot_tools.py).
// 1. Every plotly chart gets a modebar camera that saves PNG (2x) and a disk button that saves SVG,
//    both named after the chart's title and drawn by plotly.js in the browser (no server round trip).
// 2. Clicks on the rank scatter (#rank-plot) and the heatmap (#heat-plot) are written into the hidden
//    #neuron-pick box, whose input event opens the neuron inspector.
(function () {
  "use strict";
  var SVG_ICON = {width: 1000, height: 1000,
    path: "M150 100h550l150 150v650H150zM250 200v200h400V200zM300 600h400v50H300zM300 720h400v50H300z"};

  function titleOf(gd) {
    var layout = (gd && gd.layout) || {};
    var title = layout.title && (layout.title.text !== undefined ? layout.title.text : layout.title);
    var text = String(title || "hfprune-plot").replace(/<[^>]*>/g, " ");
    return text.toLowerCase().replace(/[^a-z0-9\u00c0-\u024f]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 80)
      || "hfprune-plot";
  }

  function withDownloads(P, gd, config) {
    var cfg = Object.assign({}, config || {});
    cfg.displaylogo = false;
    cfg.toImageButtonOptions = {format: "png", scale: 2, filename: titleOf(gd)};
    cfg.modeBarButtonsToAdd = [{
      name: "downloadSvg", title: "Download plot as SVG", icon: (P.Icons && P.Icons.disk) || SVG_ICON,
      click: function (g) { P.downloadImage(g, {format: "svg", filename: titleOf(g)}); }
    }];
    return cfg;
  }

  function sendPick(pick) {
    var box = document.querySelector("#neuron-pick textarea, #neuron-pick input");
    if (!box) return;
    pick.t = Date.now();  // the same point clicked twice is still a new pick
    box.value = JSON.stringify(pick);
    box.dispatchEvent(new Event("input", {bubbles: true}));
  }

  function bindClicks(gd) {
    if (!gd || gd.__hfpruneClicks || typeof gd.on !== "function") return;
    var host = gd.closest && gd.closest("#rank-plot, #heat-plot");
    if (!host) return;
    gd.__hfpruneClicks = true;
    gd.on("plotly_click", function (event) {
      var point = event && event.points && event.points[0];
      if (!point) return;
      if (host.id === "rank-plot") {
        sendPick({source: "scatter", index: point.pointIndex !== undefined ? point.pointIndex : point.pointNumber});
      } else {
        sendPick({source: "heatmap", layer: point.y, rank: point.x});
      }
    });
  }

  function patch(P) {
    if (!P || P.__hfprunePatched || typeof P.react !== "function") return;
    P.__hfprunePatched = true;
    ["react", "newPlot"].forEach(function (name) {
      var original = P[name];
      P[name] = function (gd, data, layout, config) {
        var target = typeof gd === "string" ? document.getElementById(gd) : gd;
        var result = original.call(this, gd, data, layout, withDownloads(P, {layout: layout}, config));
        Promise.resolve(result).then(function () { bindClicks(target); });
        return result;
      };
    });
  }

  // Gradio loads plotly.js on first use and assigns window.Plotly: patch it the moment it arrives.
  var current = window.Plotly;
  try {
    Object.defineProperty(window, "Plotly", {
      configurable: true,
      get: function () { return current; },
      set: function (value) { current = value; patch(value); }
    });
  } catch (e) { /* a non-configurable window.Plotly: fall back to polling */ }
  patch(current);
  var polls = 0;
  var timer = setInterval(function () { patch(window.Plotly); if (++polls > 600) clearInterval(timer); }, 500);
})();
