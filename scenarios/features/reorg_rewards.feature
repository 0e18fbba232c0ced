@money @redemption @serial
Feature: The redeemable reserve follows the active chain across a reorganisation

  The mint counts matured rewards from Bitcoin Core block by block and keeps the count in its
  database, so a restarted mint goes on from where it stopped. A reorganisation deeper
  than coinbase maturity (here onto a pre-mined branch of the rewards chain that leaves it
  just before its last reward) takes back what the replaced blocks paid: the reserve falls
  at once, a block the pool found on the replaced branch adds nothing, and a melt quoted
  before the fall is refused at payment with the reason.

  Scenario: a reorganisation removes a matured reward and a block the pool found: the mint's matured rewards follow Bitcoin Core's active chain, and a melt quoted before is refused at payment
    Given a signet stack with matured rewards and the pool side redeeming over Lightning
    And operator node "olga" on the pool's chain
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    And lightning node "alice"
    When the pool finds a block
    And the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it
    And the mint's matured rewards are what Bitcoin Core counts on the active chain
    When "alice" gets a melt quote for an invoice of its node for 10000 sat
    And node "olga" moves the pool's chain onto the pre-mined fork that drops the last reward
    Then the matured rewards fell by the reward the reorganisation removed
    And the mint's matured rewards are what Bitcoin Core counts on the active chain
    When "alice" pays that quote
    Then the payment is refused with "the rate fell since the quote" and "ask for a new quote", and "alice"'s wallet holds what it held

  Scenario: a restarted mint goes on counting matured rewards from where it stopped instead of reading the chain again
    Given a signet stack with matured rewards and the pool side redeeming over Lightning
    Then the mint's matured rewards are what Bitcoin Core counts on the active chain
    When the mint is stopped
    And the mint is started again, and its reserve is read
    Then bitcoind served at most 0 blocks since the mint started again
    And the mint's matured rewards are what Bitcoin Core counts on the active chain
