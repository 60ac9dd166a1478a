// The page: asks /api/mesh every second and draws the clusters, the map and the flow table. No framework, nothing
// fetched from elsewhere. The filter (also ?filter= and ?verdict= in the address) narrows the table as one types.
"use strict";

const params = new URLSearchParams(location.search);
const filterInput = document.getElementById("filter");
const verdictSelect = document.getElementById("verdict");
filterInput.value = params.get("filter") || "";
verdictSelect.value = params.get("verdict") || "";
let last = null;

function el(tag, attributes, text) {
  const ns = ["svg", "rect", "text", "line", "path", "g", "defs", "marker", "title"].includes(tag)
    ? "http://www.w3.org/2000/svg" : null;
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawClusters(clusters, unreachable) {
  const box = document.getElementById("clusters");
  box.replaceChildren(...clusters.map((cluster) => {
    const card = el("div", { class: "cluster", "data-cluster": cluster.name });
    card.append(el("h3", {}, cluster.name));
    card.append(el("div", { class: cluster.ready ? "ready" : "not-ready" },
      cluster.ready ? "ready" : "not ready"));
    for (const remote of cluster.remotes) {
      card.append(el("div", { class: remote.ready ? "ready" : "not-ready" },
        `${remote.name}: ${remote.ready ? "connected" : "not ready " + remote.not_ready.join(", ")}`));
    }
    for (const problem of cluster.problems) card.append(el("div", { class: "not-ready" }, problem));
    return card;
  }));
  const warn = document.getElementById("unreachable");
  warn.hidden = unreachable.length === 0;
  warn.replaceChildren(...unreachable.map((text) => el("div", {}, `flows not read from ${text}`)));
}

function drawGraph(graph) {
  const svg = document.getElementById("graph");
  const columnWidth = 320, rowHeight = 56, top = 48;
  const place = {};
  graph.clusters.forEach((cluster, column) => {
    graph.nodes.filter((n) => n.cluster === cluster).forEach((node, row) => {
      place[node.id] = { x: 20 + column * columnWidth, y: top + row * rowHeight, node };
    });
  });
  const rows = Math.max(1, ...graph.clusters.map((c) => graph.nodes.filter((n) => n.cluster === c).length));
  const width = Math.max(1, graph.clusters.length) * columnWidth, height = top + rows * rowHeight;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.style.width = `${width}px`;  // drawn at its own size: text stays readable, the page scrolls if needed
  svg.style.height = `${height}px`;
  const defs = el("defs");
  const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "6",
    markerHeight: "6", orient: "auto-start-reverse" });
  marker.append(el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#8a96a6" }));
  defs.append(marker);
  const items = [defs];
  graph.clusters.forEach((cluster, column) => {
    items.push(el("text", { class: "cluster-title", x: 20 + column * columnWidth, y: 22 }, `cluster ${cluster}`));
  });
  for (const edge of graph.edges) {
    const a = place[edge.source], b = place[edge.destination];
    if (!a || !b) continue;
    const dropped = edge.dropped > 0;
    const x1 = a.x + 200, y1 = a.y + 16, x2 = b.x === a.x ? b.x + 200 : b.x, y2 = b.y + 16;
    const bend = b.x === a.x ? 60 : 0;
    const path = el("path", { class: dropped ? "edge dropped" : "edge", "data-edge": `${edge.source} -> ${edge.destination}`,
      d: `M ${x1} ${y1} C ${x1 + 60 + bend} ${y1}, ${x2 - 60 + bend} ${y2}, ${x2} ${y2}` });
    path.append(el("title", {}, `${edge.forwarded} forwarded, ${edge.dropped} dropped ${edge.reasons.join(", ")}`));
    items.push(path);
    if (dropped) {
      items.push(el("text", { class: "edge-label", x: (x1 + x2) / 2 + bend, y: Math.min(y1, y2) - 6,
        "text-anchor": "middle" },
        edge.reasons.join(", ") || "dropped"));
    }
  }
  for (const { x, y, node } of Object.values(place)) {
    const group = el("g", { class: node.kind === "service" ? "node service" : "node", "data-node": node.id });
    group.append(el("rect", { x, y, width: 200, height: 32 }));
    group.append(el("text", { x: x + 8, y: y + 20 }, `${node.namespace ? node.namespace + "/" : ""}${node.label}`));
    items.push(group);
  }
  svg.replaceChildren(...items);
}

function drawFlows(flows) {
  const words = filterInput.value.toLowerCase().split(/\s+/).filter(Boolean);
  const verdict = verdictSelect.value;
  const shown = flows.filter((flow) => {
    if (verdict && flow.verdict !== verdict) return false;
    const text = Object.values(flow).join(" ").toLowerCase();
    return words.every((word) => text.includes(word));
  });
  const body = document.querySelector("#flows tbody");
  body.replaceChildren(...shown.slice(0, 200).map((flow) => {
    const row = el("tr", { class: flow.verdict });
    const port = flow.port ? `:${flow.port}` : "";
    for (const value of [flow.time.slice(11, 23), flow.node, `${flow.source} ${flow.source_ip}`,
      `${flow.destination} ${flow.destination_ip}${port}`, flow.protocol, flow.verdict, flow.reason]) {
      row.append(el("td", {}, value));
    }
    return row;
  }));
  document.getElementById("count").textContent = `${shown.length} of ${flows.length} flows`;
}

function draw() {
  if (!last) return;
  drawClusters(last.clusters, last.unreachable);
  drawGraph(last.graph);
  drawFlows(last.flows);
}

async function refresh() {
  try {
    const answer = await fetch("/api/mesh", { cache: "no-store" });
    last = await answer.json();
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    draw();
  } catch (error) {
    document.getElementById("updated").textContent = `not updated: ${error}`;
  }
}

filterInput.addEventListener("input", () => last && drawFlows(last.flows));
verdictSelect.addEventListener("change", () => last && drawFlows(last.flows));
refresh();
setInterval(refresh, 1000);
