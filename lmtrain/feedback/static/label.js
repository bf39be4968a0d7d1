// The rater page: rank the responses by clicking them (or pressing their numbers) from best to
// worst; "tie" puts the next one level with the one before it. The ranks go to the server in the
// hidden "ranking" field as a rank per response (1 = best, ties equal), which the server checks.
"use strict";

(function () {
  const form = document.getElementById("label-form");
  const k = Number(form.dataset.k);
  const rankingField = document.getElementById("ranking");
  const status = document.getElementById("status");
  const tieButton = document.getElementById("tie");
  // groups[g] holds the responses ranked g + 1; clicks remembers the order, for undo.
  const groups = [];
  const clicks = [];
  let tieNext = false;

  function ranks() {
    const result = new Array(k).fill(0);
    groups.forEach((group, g) => group.forEach((i) => { result[i] = g + 1; }));
    return result;
  }

  function show() {
    const current = ranks();
    for (let i = 0; i < k; i++) {
      const badge = document.getElementById("rank-" + i);
      badge.textContent = current[i] ? "#" + current[i] : "";
      document.getElementById("card-" + i).classList.toggle("ranked", current[i] > 0);
    }
    rankingField.value = clicks.length === k ? current.join(",") : "";
    tieButton.classList.toggle("active", tieNext);
    status.textContent = clicks.length === k ? "Ranked: press Enter to submit." :
        clicks.length + " of " + k + " ranked";
  }

  function pick(i) {
    if (i < 0 || i >= k || clicks.includes(i)) return;
    if (tieNext && groups.length) groups[groups.length - 1].push(i);
    else groups.push([i]);
    clicks.push(i);
    tieNext = false;
    show();
  }

  function undo() {
    const last = clicks.pop();
    if (last === undefined) return;
    const group = groups[groups.length - 1];
    group.splice(group.indexOf(last), 1);
    if (!group.length) groups.pop();
    show();
  }

  function toggleTie() {
    tieNext = !tieNext && clicks.length > 0;
    show();
  }

  document.querySelectorAll(".pick").forEach((area) => {
    area.addEventListener("click", () => pick(Number(area.dataset.index)));
  });
  tieButton.addEventListener("click", toggleTie);
  document.getElementById("undo").addEventListener("click", undo);

  form.addEventListener("submit", (event) => {
    if (event.submitter && event.submitter.value === "skip") return;
    if (clicks.length !== k) {
      event.preventDefault();
      status.textContent = "Rank all " + k + " responses first.";
    }
  });

  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey ||
        (target && target.closest && target.closest("select, input, textarea"))) return;
    if (/^[1-9]$/.test(event.key)) pick(Number(event.key) - 1);
    else if (event.key === "t") toggleTie();
    else if (event.key === "u") undo();
    else if (event.key === "s") form.requestSubmit(document.getElementById("skip"));
    else if (event.key === "Enter") form.requestSubmit(document.getElementById("submit"));
    else return;
    event.preventDefault();
  });

  show();
})();
