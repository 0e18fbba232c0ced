@redemption
Feature: Lightning redemption: ehash is redeemed for sats the pool's Lightning node pays at the mint's rate, never more than the matured rewards minus the pool fee

  The stack starts from the rewards chain (matured coinbases held by the pool's Lightning
  node, built once per machine), the pool pays that node's address, and the mint melts
  ehash (NUT-05, bolt11) at rate = (matured rewards - pool fee - redeemed) / ehash
  outstanding, paying through that node with cdk-cln. Each operator has its own node with a
  channel from the pool's node.

  Background:
    Given a signet stack with matured rewards and the pool side redeeming over Lightning
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    And lightning node "alice"
    When lightning node "pool" opens a 10000000 sat channel to "alice"
    Then the channel between "pool" and "alice" is normal
    When miner "m" has 3 accepted shares
    And the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it

  Scenario: an operator redeems ehash against an invoice of its own node
    When "alice" redeems ehash against an invoice of its node for 10000 sat
    Then the redemption of "alice" is PAID: its node holds the invoice's sats more in its channel and its wallet holds what was melted less
    And the mint's outstanding ehash fell by what was melted
    And every PAID redemption is one payment of the pool's node, and the sats redeemed never exceed the matured rewards minus the pool fee

  Scenario: a redemption above the pool's reserve is refused with a clear error and nothing is spent
    When "alice" tries to redeem against an invoice of its node for 16000000000 sat
    Then the redemption is refused with "exceeds the pool's redeemable reserve" and "alice"'s wallet and node are unchanged
    When "alice" redeems ehash against an invoice of its node for 20000 sat
    Then the redemption of "alice" is PAID: its node holds the invoice's sats more in its channel and its wallet holds what was melted less
    And every PAID redemption is one payment of the pool's node, and the sats redeemed never exceed the matured rewards minus the pool fee

  Scenario: two operators redeem at the same time: both are paid and the totals are exact
    Given a proxy "bob" with a locking key
    And an honest miner "b" behind proxy "bob"
    And lightning node "bob"
    When lightning node "pool" opens a 10000000 sat channel to "bob"
    Then the channel between "pool" and "bob" is normal
    When miner "b" has 2 accepted shares
    And the miners stop
    Then every quote of "bob" becomes PAID and its wallet mints it
    When "alice" and "bob" redeem at the same time, a tenth of what each one's ehash is worth
    Then the redemption of "alice" is PAID: its node holds the invoice's sats more in its channel and its wallet holds what was melted less
    And the redemption of "bob" is PAID: its node holds the invoice's sats more in its channel and its wallet holds what was melted less
    And every PAID redemption is one payment of the pool's node, and the sats redeemed never exceed the matured rewards minus the pool fee

  Scenario: the operator's node is down during the payment: the melt does not complete, no ehash is lost, and it completes once the node is back
    When "alice" makes an invoice of 12000 sat on its node
    And lightning node "alice" stops
    And "alice" redeems against that invoice while its node is down
    Then the redemption does not complete and "alice"'s wallet gets every ehash back
    When lightning node "alice" starts again and the pool's node reconnects to it
    And "alice" redeems that invoice again
    Then the redemption of "alice" is PAID: its node holds the invoice's sats more in its channel and its wallet holds what was melted less
    And every PAID redemption is one payment of the pool's node, and the sats redeemed never exceed the matured rewards minus the pool fee

  Scenario: the pool's node is killed with SIGKILL during a payment: after it restarts the invoice is paid exactly once and no ehash is lost
    When "alice" makes an invoice of 13000 sat on its node
    And lightning node "alice" is paused
    And "alice" starts redeeming that invoice
    Then the pool's node has the payment to "alice" in flight
    When lightning node "pool" is killed with SIGKILL
    And lightning node "pool" starts again and lightning node "alice" resumes
    Then the redemption of "alice" completes exactly once at the quoted rate and no ehash is lost
