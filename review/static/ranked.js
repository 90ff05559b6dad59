// Ranked review, for review.js's grid: the scores on demand, near-duplicate groups (a closed
// group shows its best member; a decision on it rejects its undecided duplicates), the keeper
// model's own rejections (hidden until shown, undoable), and "keep the top N" / "reject the
// rest", each one action that one undo walks back.
"use strict";

window.PixelmillRanked = (function () {
  // The model's rejection is in force: no person decided the image and none undid it.
  function isAuto(card) {
    return card.dataset.auto === "yes" && !card.dataset.decision;
  }

  function isClosedGroup(card) {
    return (
      card.dataset.lead === "yes" &&
      Number(card.dataset.groupSize || 1) > 1 &&
      !card.classList.contains("open")
    );
  }

  function visible(cards, gridEl) {
    const showAuto = gridEl.classList.contains("show-auto");
    return cards.filter((card) => !card.hidden && (showAuto || !isAuto(card)));
  }

  function remembered(name) {
    try {
      return localStorage.getItem(name) === "yes";
    } catch (_) {
      return false;
    }
  }

  function remember(name, on) {
    try {
      localStorage.setItem(name, on ? "yes" : "no");
    } catch (_) {
      // private windows may refuse storage: the choice lasts for this page
    }
  }

  // The actions of one grid; ``grid`` gives what review.js's Grid owns (see there).
  function actions(grid) {
    const { cards, gridEl, itemId } = grid;
    let count = ""; // digits typed before t

    function cardOf(imageId) {
      return cards.find((card) => Number(card.dataset.image) === imageId);
    }

    function applyChanged(changed) {
      for (const change of changed || []) {
        const card = cardOf(change.image_id);
        if (card) grid.show(card, change.decision);
      }
    }

    function toggleGroup() {
      const card = grid.current();
      if (!card) return;
      const lead = cards.find(
        (other) => other.dataset.group === card.dataset.group && other.dataset.lead === "yes"
      );
      if (!lead || Number(lead.dataset.groupSize || 1) < 2) {
        grid.say("Not a group: no near-duplicates of this image.");
        return;
      }
      const open = !lead.classList.contains("open");
      lead.classList.toggle("open", open);
      cards
        .filter((other) => other.dataset.group === lead.dataset.group && other !== lead)
        .forEach((member) => (member.hidden = !open));
      grid.refit();
      grid.moveTo(visible(cards, gridEl).indexOf(open ? card : lead));
      grid.say(open ? "Group open: decide each image." : "Group closed.");
    }

    function send(path, body, optimistic) {
      const before = optimistic.map((card) => card.dataset.decision);
      optimistic.forEach((card) => grid.show(card, "keep"));
      grid.enqueue(async () => {
        try {
          const result = await grid.post(path, body);
          applyChanged(result.changed);
          grid.renewed();
          grid.say(`${(result.changed || []).length} images decided (u undoes them all).`);
        } catch (error) {
          optimistic.forEach((card, i) => grid.show(card, before[i]));
          throw error;
        }
      });
    }

    // Keep the top N undecided cards (typed digits), or without digits those above the cut.
    function keepTop() {
      const typed = count;
      count = "";
      if (!typed && !grid.hasCut) {
        grid.say("Type how many first (3 t keeps the top 3): there is no cut line here.");
        return;
      }
      const shown = visible(cards, gridEl).filter((c) => !c.dataset.decision && !isAuto(c));
      const chosen = typed
        ? shown.slice(0, Number(typed))
        : shown.filter((card) => !card.classList.contains("below-cut"));
      if (!chosen.length) {
        grid.say(typed ? "Nothing undecided to keep." : "Nothing undecided above the cut.");
        return;
      }
      const decisions = chosen.map((card) => ({
        image_id: Number(card.dataset.image),
        decision: "keep",
        group: isClosedGroup(card),
      }));
      send(`/api/items/${itemId}/decisions/batch`, { decisions: decisions }, chosen);
    }

    function rejectRest() {
      count = "";
      send(`/api/items/${itemId}/reject-rest`, undefined, []);
    }

    function undoAuto() {
      const card = grid.current();
      if (!card || !isAuto(card)) {
        grid.say("r undoes a rejection made by the model: show them with a.");
        return;
      }
      grid.enqueue(async () => {
        const result = await grid.post(`/api/items/${itemId}/auto-rejects/${card.dataset.image}/undo`);
        card.dataset.auto = "";
        grid.show(card, card.dataset.decision);
        grid.renewed();
        grid.say(result.undone ? "The model's rejection is undone: decide the image." : "");
      });
    }

    function toggleScores() {
      const on = gridEl.classList.toggle("show-scores");
      remember("pixelmill.scores", on);
    }

    function toggleAuto() {
      const on = gridEl.classList.toggle("show-auto");
      grid.refit();
      const auto = cards.filter(isAuto).length;
      grid.say(on ? `${auto} rejected by the model shown (dimmed; r undoes one).` : "");
      if (!on && grid.current() && isAuto(grid.current())) grid.moveTo(0);
    }

    function digit(key) {
      count = (count + key).slice(0, 4);
      grid.say(`Keep the top ${count}: press t.`);
    }

    if (remembered("pixelmill.scores")) gridEl.classList.add("show-scores");

    return {
      applyChanged: applyChanged,
      pending: () => count !== "",
      keys: {
        g: toggleGroup,
        t: keepTop,
        X: rejectRest,
        r: undoAuto,
        s: toggleScores,
        a: toggleAuto,
      },
      digit: digit,
    };
  }

  return { isAuto: isAuto, isClosedGroup: isClosedGroup, visible: visible, actions: actions };
})();
