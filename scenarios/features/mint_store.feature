@money @serial
Feature: The mint keeps every record it was handed and no state a stranger can grow

  A share record the pool acknowledged must become a quote, even when the mint's database
  is briefly unavailable: only a record that can never be a quote is set aside, with its
  reason. A signed lookup names the mint it is for, so one captured elsewhere cannot be
  replayed here, and lookups from keys the mint has never seen leave nothing behind.

  Scenario: another process holds the mint database's write lock longer than its busy timeout while records arrive: once it lets go, every record has its quote; a record no quote can be made of is set aside with its reason
    Given a signet stack with the pool side
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    When miner "m" has 2 accepted shares
    And the mint is paused while miner "m" gets 20 more accepted shares, and another process holds its database's write lock for 45 seconds from when it resumes
    Then every share record has exactly one quote
    When a share record whose locking key is no curve point reaches the mint
    Then that record is in mint:dead with a reason naming "point", and nothing is left pending
    When miner "m" has 2 more accepted shares
    Then every share record has exactly one quote
    When the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it
    And the wallet of "alice" holds exactly what its accepted shares were worth

  Scenario: a lookup must name this mint: one signed the old way or for another mint is refused, and the operator's own lookups go on
    Given a signet stack with the pool side
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    When miner "m" has 2 accepted shares
    And a lookup for "alice"'s key is signed the old way, naming no mint
    Then the mint refuses it with status 401, code 30009 and a detail saying "sign lookups v2"
    When a lookup for "alice"'s key is signed for another mint
    Then the mint refuses it with status 401, code 30010 and a detail saying "signed for another mint"
    When the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it

  Scenario: lookups signed by 20000 fresh keys leave the mint's database as it was
    Given a signet stack with the pool side
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    When miner "m" has 2 accepted shares
    And the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it
    When 20000 lookups are signed by fresh keys
    Then the mint's database grew by less than 1024 KB
    And every quote of "alice" becomes PAID and its wallet mints it

  Scenario: a key's quotes are answered in pages of at most 1000, each once; an unissued-only lookup leaves out what the wallet minted
    Given a signet stack with the pool side
    And a proxy "alice" with a locking key
    When a farm of 20 miners in one process mines behind proxy "alice" until its key has 1500 share records, then stops
    Then "alice"'s quotes come in pages of at most 1000, full but the last: one for each share record of its key, each once
    And a lookup asking for 1001 quotes a page is refused with status 400 and code 30006
    And every quote of "alice" becomes PAID and its wallet mints it
    And an unissued-only lookup of "alice"'s key returns none of the quotes its wallet minted
