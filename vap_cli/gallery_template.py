"""`vap gallery`, the page's fixed parts: the style sheet and the script (filter, sort, playback).

Inline only: no fonts, scripts or styles from anywhere else, so the page works offline. The
Content-Security-Policy says so to the browser too (no network access from script; media only
from the links the page was written with).
"""

from __future__ import annotations

STYLE = """
:root { color-scheme: light dark; --bg: #f4f4f5; --card: #fff; --ink: #18181b; --muted: #71717a;
  --line: #e4e4e7; --ok: #15803d; --bad: #b91c1c; --run: #a16207; --media: #27272a; }
@media (prefers-color-scheme: dark) { :root { --bg: #18181b; --card: #232326; --ink: #f4f4f5;
  --muted: #a1a1aa; --line: #3f3f46; --ok: #4ade80; --bad: #f87171; --run: #facc15; --media: #000; } }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
body > header { position: sticky; top: 0; z-index: 2; background: var(--bg); padding: 12px 20px 10px;
  border-bottom: 1px solid var(--line); }
h1 { font-size: 20px; margin: 0 0 2px; }
.meta { color: var(--muted); margin: 0 0 8px; }
.controls { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; }
.controls input { flex: 1 1 280px; max-width: 480px; padding: 6px 10px; font: inherit;
  border: 1px solid var(--line); border-radius: 6px; background: var(--card); color: var(--ink); }
.controls select, .controls button { font: inherit; padding: 5px 8px; border-radius: 6px;
  border: 1px solid var(--line); background: var(--card); color: var(--ink); }
#shown { color: var(--muted); }
main { padding: 8px 20px 24px; }
.group { margin: 14px 0 22px; }
.group > h2 { font-size: 16px; margin: 0 0 8px; font-family: ui-monospace, Menlo, Consolas, monospace; }
.group > h2 .runs { color: var(--muted); font-weight: normal; font-family: system-ui, sans-serif;
  font-size: 13px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px;
  display: flex; flex-direction: column; gap: 8px; min-width: 0; }
.card-head { display: flex; gap: 8px; align-items: baseline; flex-wrap: wrap; }
.card-head code { font-size: 12px; }
.card-head time { color: var(--muted); margin-left: auto; font-size: 12px; }
.badge { font-size: 12px; font-weight: 600; padding: 1px 8px; border-radius: 999px;
  border: 1px solid currentColor; }
.state-succeeded .badge { color: var(--ok); }
.state-failed .badge, .state-cancelled .badge { color: var(--bad); }
.state-running .badge, .state-queued .badge, .state-dispatched .badge, .state-storing .badge {
  color: var(--run); }
.media { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 8px; }
figure { margin: 0; min-width: 0; }
figcaption { font-size: 12px; color: var(--muted); margin-bottom: 3px; }
figure video, figure img, .slot { display: block; width: 100%; height: 200px; object-fit: contain;
  background: var(--media); border-radius: 6px; }
.slot { padding: 10px; overflow: auto; font-size: 13px; background: transparent;
  border: 1px dashed var(--line); }
.slot.errors { border: 1px solid var(--bad); color: var(--bad); }
.slot ul { margin: 0; padding-left: 18px; }
.slot p { margin: 0 0 6px; }
.text { margin: 0; }
.text dt { font-size: 12px; color: var(--muted); }
.text dd { margin: 0 0 4px; white-space: pre-wrap; overflow-wrap: anywhere; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(118px, 1fr)); gap: 4px 12px;
  margin: 0; }
.facts div { min-width: 0; }
.facts dt { font-size: 11px; color: var(--muted); }
.facts dd { margin: 0; overflow-wrap: anywhere; }
.note { font-size: 12px; color: var(--muted); }
a { color: inherit; }
footer { color: var(--muted); padding: 0 20px 20px; font-size: 12px; }
"""

SCRIPT = """
(function () {
  "use strict";
  var main = document.getElementById("groups");
  var filter = document.getElementById("filter");
  var sort = document.getElementById("sort");
  var direction = document.getElementById("direction");
  var shown = document.getElementById("shown");
  var total = main.querySelectorAll(".card").length;
  // Newest, longest and dearest first; names A to Z. The arrow button flips the order.
  var descending = { time: true, name: false, duration: true, cost: true };
  var desc = descending[sort.value];

  function value(card, by) {
    var raw = card.getAttribute("data-" + by);
    if (raw === null || raw === "") { return null; }
    return by === "name" ? raw : Number(raw);
  }
  function compare(by) {
    return function (a, b) {
      var x = value(a, by), y = value(b, by);
      if (x !== y) {
        if (x === null) { return 1; }  // unknown values last, in either direction
        if (y === null) { return -1; }
        var c = x < y ? -1 : 1;
        return desc ? -c : c;
      }
      return Number(b.getAttribute("data-time")) - Number(a.getAttribute("data-time"));
    };
  }
  function apply() {
    var cmp = compare(sort.value);
    var groups = Array.prototype.slice.call(main.querySelectorAll(".group"));
    groups.forEach(function (group) {
      var list = group.querySelector(".cards");
      var cards = Array.prototype.slice.call(list.children).sort(cmp);
      cards.forEach(function (card) { list.appendChild(card); });
    });
    groups.sort(function (a, b) { return cmp(a.querySelector(".card"), b.querySelector(".card")); });
    groups.forEach(function (group) { main.appendChild(group); });
    var words = filter.value.toLowerCase().split(/\\s+/).filter(Boolean);
    var visible = 0;
    groups.forEach(function (group) {
      var any = false;
      group.querySelectorAll(".card").forEach(function (card) {
        var text = card.getAttribute("data-search");
        var hit = words.every(function (w) { return text.indexOf(w) >= 0; });
        card.hidden = !hit;
        if (hit) { any = true; visible += 1; }
      });
      group.hidden = !any;
    });
    shown.textContent = visible + " of " + total + (total === 1 ? " job" : " jobs");
    direction.textContent = desc ? "\\u2193" : "\\u2191";
  }
  filter.addEventListener("input", apply);
  sort.addEventListener("change", function () { desc = descending[sort.value]; apply(); });
  direction.addEventListener("click", function () { desc = !desc; apply(); });

  // A medium that does not load (a link that expired, an object deleted since, a file missing
  // beside the page) says so in its place.
  var expires = document.body.getAttribute("data-expires");
  var expiresMs = Number(document.body.getAttribute("data-expires-ms"));
  function broken(element) {
    var figure = element.closest("figure");
    if (!figure || figure.querySelector(".slot")) { return; }
    var note = document.createElement("div");
    note.className = "slot errors broken";
    note.textContent = expiresMs && Date.now() > expiresMs ?
      "Could not load this file: the links expired at " + expires + "; run vap gallery again." :
      "Could not load this file: it is no longer there, or not readable.";
    element.replaceWith(note);
  }
  document.querySelectorAll("video, img").forEach(function (element) {
    element.addEventListener("error", function () { broken(element); });
    if ((element.tagName === "VIDEO" && element.error) ||
        (element.tagName === "IMG" && element.complete && element.naturalWidth === 0)) { broken(element); }
  });

  // Videos play while on screen (muted, looping) and pause off screen, so a long page stays light.
  var videos = document.querySelectorAll("video");
  if ("IntersectionObserver" in window) {
    var seen = new IntersectionObserver(function (entries) {
      entries.forEach(function (entry) {
        if (entry.isIntersecting) { entry.target.play().catch(function () {}); }
        else { entry.target.pause(); }
      });
    }, { rootMargin: "200px" });
    videos.forEach(function (video) { seen.observe(video); });
  }
  apply();
}());
"""

# The filter box, the sort order and its direction, and the count the script keeps up to date.
CONTROLS = (
    '<div class="controls"><input id="filter" type="search" aria-label="filter" '
    'placeholder="Filter: name, prompt, job id, state, backend, seed, error…">'
    '<label>Sort by <select id="sort"><option value="time">time</option><option value="name">name</option>'
    '<option value="duration">duration</option><option value="cost">cost</option></select></label>'
    '<button id="direction" type="button" title="reverse the order">&#8595;</button>'
    '<span id="shown"></span></div>'
)

FOOTER = (
    "<footer>Written by <code>vap gallery</code>. Costs are estimates from the stack's configured prices, "
    "not a bill.</footer>\n"
)

# What the page may load: its own inline style and script, and media from the links it was
# written with (filled in per page); nothing may be fetched by script.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "img-src {media}; media-src {media}; base-uri 'none'; form-action 'none'"
)
