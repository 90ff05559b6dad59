// The review pages: keyboard first. Every decision is sent at once (in order, one at a time).
// The next item is claimed and loaded ahead of time, so Enter shows it without a page load;
// the hold on the item on screen counts down and is renewed while the reviewer works.
"use strict";

(function () {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";
  const GRID_SIZES = ["s", "m", "l"];
  const Ranked = window.PixelmillRanked;
  let grid = null; // the controller of the item on screen
  let reopenTimer = null;

  class RequestError extends Error {
    constructor(message, status, code) {
      super(message);
      this.status = status;
      this.code = code || "";
    }
  }

  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body === undefined ? "{}" : JSON.stringify(body),
      credentials: "same-origin",
    });
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const detail = data && data.detail ? data.detail : response.statusText;
      const text = typeof detail === "string" ? detail : JSON.stringify(detail);
      throw new RequestError(text, response.status, data && data.code);
    }
    return data;
  }

  function clock(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  }

  // --- Undo after Enter: reopen the item submitted last, while its window lasts ---------

  function showReopen(itemId, key, seconds) {
    const form = document.getElementById("reopen");
    if (!form) return;
    clearInterval(reopenTimer);
    if (itemId) {
      form.action = `/items/${itemId}/reopen`;
      form.querySelector(".reopen-key").textContent = key;
      form.dataset.seconds = String(seconds);
    }
    let left = Number(form.dataset.seconds || 0);
    const label = form.querySelector(".reopen-left");
    const tick = () => {
      form.hidden = left <= 0;
      label.textContent = `${left} s left`;
      left -= 1;
      if (left < 0) clearInterval(reopenTimer);
    };
    tick();
    reopenTimer = setInterval(tick, 1000);
  }

  function reopenLast() {
    const form = document.getElementById("reopen");
    if (form && !form.hidden) form.requestSubmit();
  }

  // --- The grid of one item ----------------------------------------------------------

  function Grid(section, submitted) {
    const itemId = section.dataset.item;
    const runId = section.dataset.run;
    const holder = section.dataset.holder === "yes";
    const lease = Number(section.dataset.leaseSeconds || 0);
    const cards = Array.from(section.querySelectorAll("#grid .card"));
    const gridEl = section.querySelector("#grid");
    const message = section.querySelector("#message");
    const zoom = section.querySelector("#zoom");
    const nextForm = section.querySelector("#next-form");
    const holdEl = section.querySelector("#hold");
    const sizeSelect = section.querySelector("#grid-size");
    const cutLine = section.querySelector("#cut-line");
    const visible = () => Ranked.visible(cards, gridEl);
    // The focused card (an element: hidden group members and the model's rejections come
    // and go, so a position would move under it).
    let current = visible().find((card) => !card.dataset.decision) || visible()[0] || null;
    const at = () => Math.max(0, visible().indexOf(current));
    let queue = Promise.resolve(true); // pending requests, in the order they were made
    let busy = false; // submitting or re-rolling: no more input
    let lost = false; // someone else holds the item now
    let holdLeft = Number(section.dataset.holdSeconds || 0);
    let lastRenewal = Date.now();
    let holdTimer = null;
    // Renew at most this often while the reviewer is active (well inside the lease).
    const renewEveryMs = Math.max(2000, Math.min(30000, (lease * 1000) / 3));
    const upcoming = holder ? prefetchNext() : Promise.resolve(null);

    function say(text, isError) {
      message.textContent = text;
      message.classList.toggle("error", Boolean(isError));
      message.classList.remove("alert");
    }

    function fail(error) {
      if (error.status === 409 && (error.code === "taken_over" || error.code === "held")) {
        loseHold(error.message);
      } else {
        say(error.message, true);
      }
    }

    function loseHold(text) {
      lost = true;
      section.classList.add("lost");
      message.textContent = text;
      message.classList.add("error", "alert");
      message.setAttribute("role", "alert");
      section.querySelector("#submit").disabled = true;
      section.querySelector("#reroll").disabled = true;
      const takeNext = section.querySelector("#take-next");
      takeNext.hidden = false;
      takeNext.focus();
      clearInterval(holdTimer);
      if (holdEl) holdEl.querySelector(".hold-left").textContent = "taken over";
    }

    // Run requests one after another; a failure is shown and stops nothing but itself.
    function enqueue(work) {
      queue = queue.then(work).then(
        () => true,
        (error) => {
          fail(error);
          return false;
        }
      );
      return queue;
    }

    // --- the hold's countdown and its renewal ---

    function renderHold() {
      if (!holdEl || lost) return;
      const left = holdEl.querySelector(".hold-left");
      holdEl.classList.toggle("low", holdLeft > 0 && holdLeft <= 60);
      holdEl.classList.toggle("expired", holdLeft <= 0);
      left.textContent =
        holdLeft > 0 ? clock(holdLeft) : "expired: others may take this item now";
    }

    function renewed(seconds) {
      holdLeft = seconds;
      lastRenewal = Date.now();
      renderHold();
    }

    function renewHold() {
      if (!holder || lost || busy) return;
      lastRenewal = Date.now();
      enqueue(async () => {
        const result = await post(`/api/items/${itemId}/hold`);
        renewed(result.hold_seconds);
      });
    }

    function activity() {
      if (Date.now() - lastRenewal >= renewEveryMs) renewHold();
    }

    if (holder) {
      holdTimer = setInterval(() => {
        holdLeft -= 1;
        renderHold();
      }, 1000);
      renderHold();
    }

    // --- the next item, claimed and loaded ahead of time ---

    async function prefetchNext() {
      try {
        const claim = await post(`/api/runs/${runId}/claim?besides=${itemId}`);
        if (!claim.review_item_id) return null;
        const response = await fetch(`/items/${claim.review_item_id}`, {
          credentials: "same-origin",
        });
        if (!response.ok) return null;
        const doc = new DOMParser().parseFromString(await response.text(), "text/html");
        if (!doc.getElementById("item")) return null;
        doc.querySelectorAll("#grid img").forEach((img) => {
          new Image().src = img.getAttribute("src"); // in the cache before it is shown
        });
        return { id: claim.review_item_id, doc: doc };
      } catch (_) {
        return null; // Enter falls back to loading the next page
      }
    }

    function swapTo(next, reopenable) {
      const header = document.querySelector("header.bar");
      header.replaceWith(document.importNode(next.doc.querySelector("header.bar"), true));
      const main = document.querySelector("main");
      main.replaceWith(document.importNode(next.doc.querySelector("main"), true));
      document.title = next.doc.title;
      history.pushState(null, "", `/items/${next.id}`);
      clearInterval(holdTimer);
      const submitted = reopenable ? { id: itemId, key: section.dataset.key } : null;
      grid = Grid(document.getElementById("item"), submitted);
    }

    // --- decisions ---

    function count() {
      const counts = { keep: 0, reject: 0, undecided: 0, auto: 0 };
      cards.forEach((card) => {
        counts[Ranked.isAuto(card) ? "auto" : card.dataset.decision || "undecided"] += 1;
      });
      section.querySelectorAll("[data-count]").forEach((el) => {
        el.textContent = String(counts[el.dataset.count]);
      });
    }

    function show(card, decision) {
      card.dataset.decision = decision || "";
      card.classList.toggle("keep", decision === "keep");
      card.classList.toggle("reject", decision === "reject");
      card.classList.toggle("auto", Ranked.isAuto(card));
      count();
      if (!zoom.hidden && card === current) fillZoom();
    }

    function moveTo(index) {
      const list = visible();
      if (!list.length) return;
      current = list[Math.min(list.length - 1, Math.max(0, index))];
      cards.forEach((card) => card.classList.toggle("focused", card === current));
      current.focus({ preventScroll: true });
      current.scrollIntoView({ block: "nearest" });
      if (!zoom.hidden) fillZoom();
    }

    function columns() {
      const list = visible();
      if (list.length < 2) return 1;
      const top = list[0].offsetTop;
      const n = list.findIndex((card) => card.offsetTop !== top);
      return n === -1 ? list.length : n;
    }

    function decide(decision) {
      const card = current;
      if (!card || lost) return;
      const before = card.dataset.decision;
      const group = Ranked.isClosedGroup(card);
      show(card, decision); // at once; put back if the server refuses
      moveTo(at() + 1);
      enqueue(async () => {
        try {
          const result = await post(`/api/items/${itemId}/decisions`, {
            image_id: Number(card.dataset.image),
            decision: decision,
            group: group,
          });
          ranked.applyChanged(result.changed);
          renewed(lease);
          say(group ? `${result.changed.length} images decided: the best, and its duplicates rejected.` : "");
        } catch (error) {
          show(card, before);
          throw error;
        }
      });
    }

    function undo() {
      if (lost) return;
      enqueue(async () => {
        const result = await post(`/api/items/${itemId}/undo`);
        renewed(lease);
        if (result.image_id === null) {
          say("Nothing to undo.");
          return;
        }
        ranked.applyChanged(result.changed);
        const card = cards.find((c) => Number(c.dataset.image) === result.image_id);
        const index = visible().indexOf(card);
        if (index !== -1) moveTo(index);
        say(result.changed.length > 1 ? `Undone: ${result.changed.length} images.` : "Undone.");
      });
    }

    // Submit or re-roll, then show the next item (a submit may be reopened from there).
    async function finish(path, question) {
      if (busy || lost) return;
      if (question && !window.confirm(question)) return;
      busy = true;
      const ok = await enqueue(() => post(path));
      if (!ok) {
        busy = false;
        return;
      }
      const next = await upcoming;
      if (next) {
        swapTo(next, path.endsWith("/submit"));
      } else {
        nextForm.submit();
      }
    }

    // --- the enlarged view ---

    function fillZoom() {
      const card = current;
      if (!card) return;
      zoom.querySelector("img").src = card.dataset.full;
      const meta = card.querySelector(".meta");
      zoom.querySelector(".meta").replaceChildren(...meta.cloneNode(true).childNodes);
      const state = zoom.querySelector(".zoom-state");
      const decision = card.dataset.decision;
      const shown = Ranked.isAuto(card) ? "rejected by the model" : decision || "undecided";
      state.textContent = `${at() + 1} of ${visible().length} · ${shown}`;
      state.className = `zoom-state ${decision}`;
    }

    function toggleZoom() {
      if (!zoom.hidden) {
        zoom.hidden = true;
        return;
      }
      const card = current;
      if (!card || !card.dataset.full) return;
      zoom.hidden = false;
      fillZoom();
    }

    // --- the grid's size ---

    function fitGrid() {
      const list = visible();
      const n = list.length;
      if (!n) return;
      const style = getComputedStyle(gridEl);
      const gap = parseFloat(style.columnGap) || 0;
      const width = gridEl.clientWidth;
      const top = gridEl.getBoundingClientRect().top + window.scrollY;
      // The cut line takes a row of its own between the cards above and below it.
      const above = cutLine
        ? list.filter((card) => cutLine.compareDocumentPosition(card) & 2).length
        : n;
      const lineHeight = cutLine ? cutLine.offsetHeight + gap : 0;
      const height = window.innerHeight - top - 8 - lineHeight;
      const picture = list[0].querySelector("img, .dropped");
      const extraW = list[0].offsetWidth - (picture ? picture.offsetWidth : 0);
      const extraH = list[0].offsetHeight - (picture ? picture.offsetHeight : 0);
      let best = { side: 0, cols: 1 };
      for (let cols = 1; cols <= n; cols += 1) {
        const rows = Math.ceil(above / cols) + Math.ceil((n - above) / cols);
        const side = Math.min(
          (width - gap * (cols - 1)) / cols - extraW,
          (height - gap * (rows - 1)) / rows - extraH
        );
        if (side > best.side) best = { side: side, cols: cols };
      }
      const cell = Math.floor(Math.max(best.side, 48) + extraW);
      gridEl.style.gridTemplateColumns = `repeat(${best.cols}, ${cell}px)`;
    }

    function applySize(size) {
      gridEl.dataset.size = size;
      sizeSelect.value = size;
      gridEl.style.gridTemplateColumns = "";
      if (size === "fit") fitGrid();
      try {
        localStorage.setItem("pixelmill.grid", size);
      } catch (_) {
        // private windows may refuse storage: the size lasts for this page
      }
    }

    function stepSize(step) {
      const current = GRID_SIZES.indexOf(gridEl.dataset.size);
      const from = current === -1 ? 1 : current;
      applySize(GRID_SIZES[Math.min(GRID_SIZES.length - 1, Math.max(0, from + step))]);
    }

    // --- keys ---

    function zoomKey(key) {
      const handlers = {
        ArrowRight: () => moveTo(at() + 1),
        ArrowLeft: () => moveTo(at() - 1),
        k: () => decide("keep"),
        x: () => decide("reject"),
        u: () => undo(),
        z: () => toggleZoom(),
        Escape: () => (zoom.hidden = true),
      };
      return handlers[key];
    }

    function gridKey(key) {
      const reroll = () =>
        finish(`/api/items/${itemId}/reroll`, "None of these: render more seeds for this item?");
      if (/^[0-9]$/.test(key) && (key !== "0" || ranked.pending())) {
        return () => ranked.digit(key);
      }
      const handlers = {
        ...ranked.keys,
        ArrowRight: () => moveTo(at() + 1),
        ArrowLeft: () => moveTo(at() - 1),
        ArrowDown: () => moveTo(at() + columns()),
        ArrowUp: () => moveTo(at() - columns()),
        k: () => decide("keep"),
        x: () => decide("reject"),
        u: () => undo(),
        U: () => reopenLast(),
        z: () => toggleZoom(),
        n: reroll,
        Enter: () => finish(`/api/items/${itemId}/submit`),
        "-": () => stepSize(-1),
        "+": () => stepSize(1),
        "=": () => stepSize(1),
        0: () => applySize("fit"),
      };
      return handlers[key];
    }

    function key(event) {
      activity();
      if (busy) return;
      if (event.target instanceof HTMLSelectElement) return;
      const handler = zoom.hidden ? gridKey(event.key) : zoomKey(event.key);
      if (handler) {
        event.preventDefault();
        handler();
      }
    }

    const ranked = Ranked.actions({
      cards: cards,
      gridEl: gridEl,
      itemId: itemId,
      hasCut: Boolean(section.dataset.cut),
      post: post,
      enqueue: enqueue,
      show: show,
      say: say,
      moveTo: moveTo,
      current: () => current,
      refit: () => gridEl.dataset.size === "fit" && fitGrid(),
      renewed: () => renewed(lease),
    });

    cards.forEach((card) =>
      card.addEventListener("click", () => moveTo(visible().indexOf(card)))
    );
    zoom.addEventListener("click", () => (zoom.hidden = true));
    section.querySelector("#submit").addEventListener("click", () =>
      finish(`/api/items/${itemId}/submit`)
    );
    section.querySelector("#reroll").addEventListener("click", () =>
      finish(`/api/items/${itemId}/reroll`, "None of these: render more seeds for this item?")
    );
    section.querySelector("#take-next").addEventListener("click", () => nextForm.submit());
    sizeSelect.addEventListener("change", () => applySize(sizeSelect.value));
    let saved = "fit";
    try {
      saved = localStorage.getItem("pixelmill.grid") || "fit";
    } catch (_) {
      saved = "fit";
    }
    applySize(["fit", ...GRID_SIZES].includes(saved) ? saved : "fit");
    count();
    moveTo(at());
    if (submitted) {
      showReopen(submitted.id, submitted.key, Number(section.dataset.reopenSeconds || 0));
    } else {
      showReopen();
    }
    renewHold(); // an item claimed ahead of time has an older hold than its page
    return {
      key: key,
      activity: activity,
      resize: () => gridEl.dataset.size === "fit" && fitGrid(),
    };
  }

  // --- wiring --------------------------------------------------------------------------

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target instanceof HTMLInputElement) return;
    if (grid) {
      grid.key(event);
    } else if (event.key === "U") {
      event.preventDefault();
      reopenLast();
    }
  });
  for (const name of ["pointerdown", "wheel", "mousemove"]) {
    document.addEventListener(name, () => grid && grid.activity(), { passive: true });
  }
  window.addEventListener("resize", () => grid && grid.resize());
  // A page put in place by the script: going back loads the page the address names.
  window.addEventListener("popstate", () => location.reload());

  const section = document.getElementById("item");
  if (section) {
    grid = Grid(section, null);
  } else {
    showReopen();
  }
})();
