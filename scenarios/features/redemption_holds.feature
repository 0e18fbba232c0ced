@money @redemption @serial
Feature: No redemption stays stuck: a melt ends paid exactly once or unpaid with every ehash back, without an operator, and none shifts the rate

  The pool's node may be down, paused or killed mid-payment, an invoice may expire and the
  mint may die between holding the sats and sending them; the mint finds out from Core
  Lightning what became of each held payment and settles or releases it on its own. While a
  melt is in flight, and while ehash awaits its audit, the rate every other holder gets is
  never raised at their expense.

  Background:
    Given the mint waits 20 s on a payment call, checks held payments every 3 s, releases an orphaned payment after 35 s and a failed or unknown one after 75 s
    And a signet stack with matured rewards and the pool side redeeming over Lightning
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    And lightning node "alice"
    When lightning node "pool" opens a 10000000 sat channel to "alice"
    Then the channel between "pool" and "alice" is normal
    When miner "m" has 3 accepted shares
    And the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it

  Scenario: the pool's node is down when a redemption is asked: the melt ends UNPAID, nothing is held, and the same invoice is paid once the node is back
    When "alice" makes an invoice of 12000 sat on its node
    And lightning node "pool" is killed with SIGKILL
    And "alice" tries to redeem that invoice
    Then the redemption ends UNPAID, "alice"'s wallet gets every ehash back and the mint holds nothing
    When lightning node "pool" starts again and reconnects to "alice"
    And "alice" redeems that invoice again
    Then the redemption of "alice" is PAID: its node holds the invoice's sats more in its channel and its wallet holds what was melted less
    And every PAID redemption is one payment of the pool's node, and the sats redeemed never exceed the matured rewards minus the pool fee

  Scenario: an expired invoice: the melt ends UNPAID and nothing is held
    When "alice" makes an invoice of 12000 sat on its node that expires in 2 seconds
    And "alice" tries to redeem that invoice
    Then the redemption ends UNPAID, "alice"'s wallet gets every ehash back and the mint holds nothing

  Scenario: the pool's node paused while the mint sends a payment: once it resumes the payment completes exactly once
    When "alice" makes an invoice of 13000 sat on its node
    And lightning node "pool" is paused
    And "alice" starts redeeming that invoice
    Then the mint holds sats for a payment
    When lightning node "pool" resumes
    Then the redemption of "alice" completes exactly once at the quoted rate and no ehash is lost

  Scenario: the mint killed between holding the sats and sending the payment: without an operator the hold is released, the ehash comes back, and the invoice is paid on a new try
    When "alice" makes an invoice of 12000 sat on its node
    And lightning node "pool" is paused
    And "alice" starts redeeming that invoice
    Then the mint holds sats for a payment
    When the mint is killed with SIGKILL
    And lightning node "pool" resumes
    Then the supervisor restarts the mint
    And the redemption ends UNPAID, "alice"'s wallet gets every ehash back and the mint holds nothing
    When "alice" redeems that invoice again
    Then the redemption of "alice" is PAID: its node holds the invoice's sats more in its channel and its wallet holds what was melted less
    And every PAID redemption is one payment of the pool's node, and the sats redeemed never exceed the matured rewards minus the pool fee

  Scenario: a melt in flight does not raise the rate: neither the rate the mint reports nor a melt quote made meanwhile gets cheaper
    When the mint's redemption rate and the cost of a melt quote for 5000 sat of "alice" are remembered
    And "alice" makes an invoice of 13000 sat on its node
    And lightning node "alice" is paused
    And "alice" starts redeeming that invoice
    Then the pool's node has the payment to "alice" in flight
    And the mint's redemption rate is no higher than remembered
    And a melt quote for the same amount costs no less ehash than remembered
    When lightning node "alice" resumes
    Then the redemption of "alice" completes exactly once at the quoted rate and no ehash is lost

  Scenario: ehash still pending audit counts as outstanding: a redemption during an auditor backlog gets no more per ehash than one after it
    When auditor "a" stops
    And an honest miner "m2" starts behind proxy "alice"
    And miner "m2" has 3 accepted shares
    And the miners stop
    And the mint's redemption rate is remembered
    And "alice" redeems ehash against an invoice of its node for 10000 sat
    And auditor "a" starts again
    Then every quote of "alice" becomes PAID and its wallet mints it
    And the mint's redemption rate is no lower than remembered

  Scenario: the pool's node killed while a payment's HTLC is only offered: that payment can never complete, and without an operator the mint releases it and the ehash comes back, while the committed payment before it is paid once
    Given a proxy "bob" with a locking key
    And an honest miner "b" behind proxy "bob"
    When miner "b" has 2 accepted shares
    And the miners stop
    Then every quote of "bob" becomes PAID and its wallet mints it
    When "alice" makes an invoice "first" worth a tenth of "bob"'s ehash on its node
    And "alice" makes an invoice "second" worth a tenth of "alice"'s ehash on its node
    And lightning node "alice" is paused
    And "bob" starts redeeming invoice "first"
    Then the pool's node has committed an HTLC for invoice "first"
    When "alice" starts redeeming invoice "second"
    Then the pool's node has offered an HTLC for invoice "second"
    When lightning node "pool" is killed with SIGKILL
    And lightning node "pool" starts again and lightning node "alice" resumes
    Then invoice "first" is paid exactly once and "bob"'s wallet holds what that melt took less
    And the redemption of invoice "second" ends UNPAID, its ehash is back and the mint holds nothing
