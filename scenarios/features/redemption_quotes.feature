@money @redemption @serial
Feature: A melt quote tells what it costs, and a melt the mint cannot pay says why

  One ehash is worth some tens of sats on the rewards chain (small matured rewards, shares
  of some hundred ehash), so a redemption's rounding to whole ehash loses little, and the
  wallet refuses one that would lose more than 1 % of its value unless the operator accepts
  it. A quote paid later is checked again at payment: if more ehash became owed since (or the
  rewards fell), the melt is refused with the reason and what to do, and the ehash stays put.

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

  Scenario: a quote shows the ehash it costs and the sats rounding loses; a redemption losing more than 1 % to rounding is refused with nothing spent, and goes through when the loss is accepted
    When "alice" gets a melt quote for an invoice of its node for 10000 sat
    Then the quote shows what it costs in ehash and the sats rounding loses, at most one ehash's worth
    When "alice" tries to redeem against an invoice of its node that loses over 1 % to rounding
    Then the redemption is refused with "lost to rounding" and "alice"'s wallet and node are unchanged
    When "alice" redeems ehash against an invoice of its node for 30 sat, accepting the loss to rounding
    Then the redemption of "alice" is PAID: its node holds the invoice's sats more in its channel and its wallet holds what was melted less
    When "alice" redeems ehash against an invoice of its node for 10000 sat
    Then the redemption of "alice" is PAID: its node holds the invoice's sats more in its channel and its wallet holds what was melted less
    And every PAID redemption is one payment of the pool's node, and the sats redeemed never exceed the matured rewards minus the pool fee

  Scenario: a quote the rate fell away from beyond its margin is refused at payment with the reason and what to do, nothing is spent, and a new quote is paid
    When "alice" gets a melt quote for an invoice of its node for 10000 sat
    And an honest miner "m2" starts behind proxy "alice"
    And the miners mine until the mint's rate is 5 % below the quote's
    And the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it
    When "alice" pays that quote
    Then the payment is refused with "the rate fell since the quote" and "ask for a new quote", and "alice"'s wallet holds what it held
    When "alice" redeems ehash against an invoice of its node for 10000 sat
    Then the redemption of "alice" is PAID: its node holds the invoice's sats more in its channel and its wallet holds what was melted less
    And every PAID redemption is one payment of the pool's node, and the sats redeemed never exceed the matured rewards minus the pool fee
