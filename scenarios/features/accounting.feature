@accounting @mining @serial
Feature: Exact share accounting: one record per share hash for the life of the pool, template ids that never repeat, an answer that always matches the write

  The mint keys quotes on share hashes and the auditor keys verdicts on template ids, so both
  are unique for the life of the pool, across channels, connections and restarts, and a share
  is acknowledged if and only if its record is in Redis. The harness's own SV2 client mines
  real shares and replays or tweaks them; Bitcoin Core and the client's header arithmetic are
  the oracles. An honest miner mines alongside every attack.

  Background:
    Given a signet stack with a pool that reaches Redis through a fault proxy
    And a proxy "alice" with a locking key
    And a slow honest miner "honest" behind proxy "alice"
    And an SV2 client "mallory" with a locking key and a channel

  Scenario: accepted shares replayed on a second channel and after a pool restart on the same tip are never recorded twice
    When client "mallory" has 3 shares accepted with ntime an hour ahead of the tip's minimum
    And client "mallory" replays its accepted shares on a second channel
    Then each replay on the second channel gives another header, above the target, and is refused with difficulty-too-low
    When the pool is killed with SIGKILL and restarts on the same tip, and client "mallory" replays its accepted shares on a new channel with their extranonce prefix
    Then every replayed share gives the same header and is refused with "duplicate-share"
    And each share client "mallory" saw accepted has exactly one record locked to its key
    And miner "honest" has 3 accepted shares

  Scenario Outline: a share with <field> no valid block could have is refused with <code> and leaves no record
    When client "mallory" submits a share with <field>
    Then the share is refused with "<code>" and has no record
    And Bitcoin Core refuses the same share's block with "<core reason>"
    When the accepted shares of miner "honest" are counted
    Then miner "honest" gets 2 more shares accepted

    Examples:
      | field                                   | code                             | core reason   |
      | ntime two hours and two minutes ahead   | invalid-share                    | time-too-new  |
      | ntime at the parent's median time past  | invalid-share                    | time-too-old  |
      | version bit 31 set                      | invalid-non-rollable-version-bit | bad-version   |

  Scenario: Redis paused past the append timeout and resumed: a share is acknowledged if and only if it has a record
    Given an honest miner "busy" behind proxy "alice"
    When miner "busy" has 3 accepted shares
    And redis is paused
    Then the pool loses the answer to at least one record append
    And miner "busy" has 1 shares rejected with "ehash-record-unavailable"
    When redis is resumed
    Then the pool settles every append whose answer it lost
    When the accepted shares of miner "busy" are counted
    Then miner "busy" gets 3 more shares accepted
    When the miners stop
    Then every share the miners saw accepted has exactly one ehash:shares record with proxy "alice"'s key and the amount its hash is worth
    And no ehash:shares record has a hash miner "busy" saw rejected

  Scenario: a proxy whose window of shares waiting for the pool is full refuses the next at once with upstream-busy, and mines on once the pool answers
    Given proxies started from now on keep at most 2 shares waiting for the pool
    And a proxy "narrow" with a locking key
    And an honest miner "quick" behind proxy "narrow"
    When miner "quick" has 3 accepted shares
    And the pool is paused
    Then miner "quick" has 1 shares rejected with "upstream-busy"
    And proxy "narrow" has 2 shares waiting for the pool's answer
    When the pool is resumed
    And the accepted shares of miner "quick" are counted
    Then miner "quick" gets 3 more shares accepted
    When the miners stop
    Then proxy "narrow" has 0 shares waiting for the pool's answer
    And proxy "narrow" counts as refused with upstream-busy exactly the shares miner "quick" saw refused so
    And every share miner "quick" saw accepted has exactly one ehash:shares record with proxy "narrow"'s key and the amount its hash is worth
    And no ehash:shares record has a hash miner "quick" saw rejected

  Scenario: requests to Redis held past the append timeout are fenced off: the shares are refused, and once delivered the requests write nothing
    Given an honest miner "busy" behind proxy "alice"
    When miner "busy" has 3 accepted shares
    And the fault proxy holds the pool's requests to Redis
    Then the pool loses the answer to at least one record append
    And the pool settles every append whose answer it lost, fencing off at least 1
    When the fault proxy delivers the held requests and Redis has acted on them
    And the accepted shares of miner "busy" are counted
    Then miner "busy" gets 3 more shares accepted
    When the miners stop
    Then every share the miners saw accepted has exactly one ehash:shares record with proxy "alice"'s key and the amount its hash is worth
    And the miners saw 1 share rejected with "ehash-record-unavailable", none of them recorded

  Scenario: the pool killed with SIGKILL twice never reuses a template id
    When miner "honest" has 2 accepted shares
    And the pool is killed with SIGKILL
    Then the supervisor restarts the pool
    When the accepted shares of miner "honest" are counted
    Then miner "honest" gets 2 more shares accepted
    When the pool is killed with SIGKILL
    Then the supervisor restarts the pool
    When the accepted shares of miner "honest" are counted
    Then miner "honest" gets 2 more shares accepted
    And the audit tasks come from 3 pool epochs and no template id names two templates
