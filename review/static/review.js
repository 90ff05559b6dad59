// The review grid: keyboard first. Every decision is sent at once (in order, one at a time);
// Enter waits for them, submits the item and asks the server for the next one.
"use strict";

(function () {
  const section = document.getElementById("item");
  if (!section) return;
  const itemId = section.dataset.item;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const cards = Array.from(document.querySelectorAll("#grid .card"));
  const message = document.getElementById("message");
  const zoom = document.getElementById("zoom");
  const nextForm = document.getElementById("next-form");
  let focus = Math.max(0, cards.findIndex((card) => !card.dataset.decision));
  let queue = Promise.resolve(true); // pending requests, in the order they were made
  let busy = false; // submitting or re-rolling: no more input

  function say(text, isError) {
    message.textContent = text;
    message.classList.toggle("error", Boolean(isError));
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
      throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    }
    return data;
  }

  // Run requests one after another; a failure is shown and stops nothing but itself.
  function enqueue(work) {
    queue = queue.then(work).then(
      () => true,
      (error) => {
        say(error.message, true);
        return false;
      }
    );
    return queue;
  }

  function show(card, decision) {
    card.dataset.decision = decision || "";
    card.classList.toggle("keep", decision === "keep");
    card.classList.toggle("reject", decision === "reject");
  }

  function moveTo(index) {
    if (!cards.length) return;
    focus = Math.min(cards.length - 1, Math.max(0, index));
    cards.forEach((card, i) => card.classList.toggle("focused", i === focus));
    cards[focus].focus({ preventScroll: true });
    cards[focus].scrollIntoView({ block: "nearest" });
  }

  function columns() {
    if (cards.length < 2) return 1;
    const top = cards[0].offsetTop;
    const n = cards.findIndex((card) => card.offsetTop !== top);
    return n === -1 ? cards.length : n;
  }

  function decide(decision) {
    const card = cards[focus];
    if (!card) return;
    const before = card.dataset.decision;
    show(card, decision); // at once; put back if the server refuses
    moveTo(focus + 1);
    enqueue(async () => {
      try {
        await post(`/api/items/${itemId}/decisions`, {
          image_id: Number(card.dataset.image),
          decision: decision,
        });
        say("");
      } catch (error) {
        show(card, before);
        throw error;
      }
    });
  }

  function undo() {
    enqueue(async () => {
      const result = await post(`/api/items/${itemId}/undo`);
      if (result.image_id === null) {
        say("Nothing to undo.");
        return;
      }
      const index = cards.findIndex((card) => Number(card.dataset.image) === result.image_id);
      if (index !== -1) {
        show(cards[index], result.decision);
        moveTo(index);
      }
      say("Undone.");
    });
  }

  async function finish(path, question) {
    if (busy) return;
    if (question && !window.confirm(question)) return;
    busy = true;
    const ok = await enqueue(() => post(path));
    if (ok) {
      nextForm.submit();
    } else {
      busy = false;
    }
  }

  function toggleZoom() {
    if (!zoom.hidden) {
      zoom.hidden = true;
      return;
    }
    const card = cards[focus];
    if (!card || !card.dataset.full) return;
    zoom.querySelector("img").src = card.dataset.full;
    zoom.hidden = false;
  }

  document.addEventListener("keydown", (event) => {
    if (busy || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target instanceof HTMLInputElement) return;
    const handlers = {
      ArrowRight: () => moveTo(focus + 1),
      ArrowLeft: () => moveTo(focus - 1),
      ArrowDown: () => moveTo(focus + columns()),
      ArrowUp: () => moveTo(focus - columns()),
      k: () => decide("keep"),
      x: () => decide("reject"),
      u: () => undo(),
      z: () => toggleZoom(),
      Escape: () => (zoom.hidden = true),
      n: () => finish(`/api/items/${itemId}/reroll`, "None of these: render more seeds for this item?"),
      Enter: () => finish(`/api/items/${itemId}/submit`),
    };
    const handler = handlers[event.key];
    if (handler) {
      event.preventDefault();
      handler();
    }
  });

  cards.forEach((card, index) => card.addEventListener("click", () => moveTo(index)));
  zoom.addEventListener("click", () => (zoom.hidden = true));
  document.getElementById("submit").addEventListener("click", () =>
    finish(`/api/items/${itemId}/submit`)
  );
  document.getElementById("reroll").addEventListener("click", () =>
    finish(`/api/items/${itemId}/reroll`, "None of these: render more seeds for this item?")
  );
  moveTo(focus);
})();
