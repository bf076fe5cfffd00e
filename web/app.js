"use strict";
// The page's state is its URL: ?q=QUERY (words, indexed photos' paths, + and -) or ?like=ROW, and
// the cut-offs &min_score=S&after=DATE&before=DATE, so a search can be shared and bookmarked.
const $ = (id) => document.getElementById(id);
const CUTOFFS = ["min_score", "after", "before"];  // each a field of the page and a parameter of the API

function setCutoffs(params) {  // from the page's fields into URLSearchParams or an object
  for (const name of CUTOFFS) {
    if (!$(name).value) continue;
    if (params instanceof URLSearchParams) params.set(name, $(name).value);
    else params[name] = $(name).value;
  }
  return params;
}
let polling = false;

async function getJSON(url, options) {
  const r = await fetch(url, options);
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function say(text, isError) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

function progress(s) {
  const of = s.total === null ? "" : ` of ${s.total.toLocaleString()}`;
  $("status").textContent = `${s.indexed.toLocaleString()}${of} photos indexed` +
    (s.indexing ? " (indexing…)" : "") + (s.failed ? `, ${s.failed} unreadable` : "");
  if (s.indexing && !polling) {
    polling = true;
    setTimeout(async () => { polling = false; progress(await getJSON("/api/status")); }, 1000);
  }
}

function show(data, title) {
  say(`${title}: ${data.results.length} of ${data.indexed.toLocaleString()} photos`);
  const tiles = data.results.map((hit) => {
    const fig = document.createElement("figure");
    fig.className = "hit";
    fig.title = hit.path;
    const img = document.createElement("img");
    img.src = `/thumb/${hit.id}`;
    img.alt = hit.path;
    img.dataset.id = hit.id;
    img.addEventListener("click", () => go({ like: hit.id }));  // more like this
    const cap = document.createElement("figcaption");
    const open = document.createElement("button");
    open.textContent = "Open";
    open.addEventListener("click", () => view(hit));
    cap.append(`#${hit.rank}  ${hit.score.toFixed(3)}`, open);
    fig.append(img, cap);
    return fig;
  });
  $("results").replaceChildren(...tiles);
  progress(data);
}

// The search parameters the API takes from the page's URL: q or id, and the cut-offs.
function apiQuery(params, name) {
  const api = new URLSearchParams({ [name]: params.get(name === "id" ? "like" : name) });
  for (const c of CUTOFFS) if (params.get(c)) api.set(c, params.get(c));
  return api;
}

async function run(params) {
  for (const c of CUTOFFS) $(c).value = params.get(c) || "";
  try {
    if (params.get("q")) {
      $("q").value = params.get("q");
      show(await getJSON(`/api/search?${apiQuery(params, "q")}`), `"${params.get("q")}"`);
    } else if (params.get("like")) {
      show(await getJSON(`/api/like?${apiQuery(params, "id")}`), `Photos like #${params.get("like")}`);
    } else {
      progress(await getJSON("/api/status"));
    }
  } catch (e) {
    say(e.message, true);
  }
}

function go(params) {
  setCutoffs(params);
  history.pushState(null, "", "?" + new URLSearchParams(params));
  $("viewer").close();
  run(new URLSearchParams(params));
}

function view(hit) {
  $("large").src = `/thumb/${hit.id}?size=large`;
  $("path").textContent = hit.path;
  $("original").href = `/photo/${hit.id}`;
  $("like").onclick = () => go({ like: hit.id });
  $("viewer").showModal();
}

// A dropped photo is searched alone or, when the box holds terms that begin with + or -
// ("- people"), combined with them.
async function searchFile(file) {
  if (!file) return;
  history.pushState(null, "", location.pathname);
  const terms = /^[+-]\s/.test($("q").value.trim()) ? $("q").value.trim() : "";
  const api = setCutoffs(new URLSearchParams({ q: terms }));
  try {
    show(await getJSON(`/api/image?${api}`, { method: "POST", body: file }), `Photos like ${file.name} ${terms}`);
  } catch (e) {
    say(`${file.name}: ${e.message}`, true);
  }
}

$("search").addEventListener("submit", (e) => {
  e.preventDefault();
  go({ q: $("q").value });
});
$("file").addEventListener("change", () => searchFile($("file").files[0]));
$("close").addEventListener("click", () => $("viewer").close());
$("rescan").addEventListener("click", async () => progress(await getJSON("/api/rescan", { method: "POST" })));
document.body.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
document.body.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.body.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("dragging");
  searchFile(e.dataTransfer.files[0]);
});
window.addEventListener("popstate", () => run(new URLSearchParams(location.search)));
run(new URLSearchParams(location.search));
