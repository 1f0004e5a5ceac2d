"use strict";
// The AuthID page: a copy button, and the AuthID handed to the window that
// opened this one -- only to the origins the broker allows, never to a wildcard.
(function () {
  var el = document.getElementById("authid");
  if (!el) { return; }
  var id = el.getAttribute("data-authid");
  var button = document.getElementById("copy");
  var status = document.getElementById("copy-status");
  function done(ok) {
    status.textContent = ok ? "Copied." : "Select the AuthID above and copy it.";
    button.setAttribute("data-copied", ok ? "yes" : "no");
  }
  function fallback() {
    var range = document.createRange();
    range.selectNodeContents(el);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    done(ok);
  }
  if (button) {
    button.addEventListener("click", function () {
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(id).then(function () { done(true); }, fallback);
      } else {
        fallback();
      }
    });
  }
  if (window.opener) {
    var origins = (el.getAttribute("data-openers") || "").split(" ");
    origins.forEach(function (origin) {
      if (!origin) { return; }
      try { window.opener.postMessage("authid:" + id, origin); } catch (e) { /* another origin */ }
    });
  }
})();
