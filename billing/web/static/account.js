// Typing another amount chooses "Other amount", so a preset left checked is not charged instead.
(function () {
  "use strict";
  var field = document.getElementById("custom_amount");
  var custom = document.getElementById("amount-custom");
  if (!field || !custom) return;
  field.addEventListener("input", function () {
    if (field.value.trim()) custom.checked = true;
  });
})();
