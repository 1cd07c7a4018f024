// The card form of a PaymentIntent top-up. Stripe.js (loaded before this file from STRIPE_JS_URL)
// mounts the card element and turns the card into a token (the number never reaches us); the
// server pays the PaymentIntent with it, and when the bank asks for authentication Stripe.js
// completes it. The account is credited by the Stripe webhook, so the page then polls the
// payment until it is credited.
(function () {
  "use strict";
  var form = document.getElementById("pay-form");
  if (!form) return;
  var button = document.getElementById("pay-button");
  var status = document.getElementById("pay-status");
  var stripe = window.Stripe(form.dataset.publishableKey);
  var card = stripe.elements().create("card");
  card.mount("#card-element");

  function say(text) {
    status.textContent = text;
  }

  function sleep(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }

  async function waitForCredit() {
    // Up to two minutes: the webhook normally lands within seconds.
    for (var attempt = 0; attempt < 120; attempt++) {
      try {
        var response = await fetch(form.dataset.statusUrl, {
          credentials: "same-origin",
          headers: { Accept: "application/json" },
        });
        if (response.ok) {
          var payment = (await response.json()).payment;
          if (payment && payment.status !== "pending") {
            window.location.assign(form.dataset.doneUrl);
            return;
          }
        }
      } catch (error) {
        // A dropped connection: keep polling.
      }
      await sleep(1000);
    }
    // Still not credited: the account page says so and refreshes itself until it is.
    window.location.assign(form.dataset.doneUrl);
  }

  // Pays with the card in the form; answers what went wrong, or nothing.
  async function pay() {
    var tokenised = await stripe.createToken(card);
    if (tokenised.error) {
      return tokenised.error.message || "The card was not accepted.";
    }
    var data = new FormData(form);
    data.append("token", tokenised.token.id);
    var response;
    try {
      response = await fetch(form.dataset.payUrl, {
        method: "POST",
        body: data,
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
    } catch (error) {
      return "The payment could not be sent. Check your connection and try again.";
    }
    var body = await response.json().catch(function () { return {}; });
    if (!response.ok) {
      // The API's error shape: {"error": {"message", "type", "param", "code"}}.
      return (body.error && body.error.message) || "The payment was not accepted.";
    }
    if (body.status === "requires_action") {
      var authenticated = await stripe.confirmCardPayment(form.dataset.clientSecret);
      if (authenticated.error) {
        return authenticated.error.message || "The payment was not authenticated.";
      }
    }
    return null;
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    button.disabled = true;
    say("Confirming your payment…");
    var problem = await pay();
    if (problem) {
      say(problem);
      button.disabled = false;
      return;
    }
    say("Payment confirmed. Waiting for it to be credited…");
    await waitForCredit();
  });
})();
