@mining @serial
Feature: Mining: miners hash on SV1 into a proxy, the proxy speaks SV2 to the pool, every accepted share is recorded before it is acknowledged

  All of it runs on the private signet (real difficulty: shares far outnumber blocks), with
  real SHA-256d miners, a Noise-encrypted SV2 connection and Redis.

  Background:
    Given a signet stack with a pool
    And a proxy "alice" with a locking key

  Scenario: two miners behind one proxy: every accepted share has exactly one record with the right key and amount
    Given honest miners "m1" and "m2" behind proxy "alice"
    When miners "m1" and "m2" each have 15 accepted shares
    And the miners stop
    Then every share the miners saw accepted has exactly one ehash:shares record with proxy "alice"'s key and the amount its hash is worth
    And the pool counted as many accepted shares as there are ehash:shares records

  Scenario: a share below the target is refused with difficulty-too-low and leaves no record
    When a below-target miner "low" mines behind proxy "alice"
    Then miner "low" has 3 shares rejected with "difficulty-too-low"
    And no ehash:shares record has a hash miner "low" saw rejected

  Scenario: a duplicate share is refused with duplicate-share and recorded once
    When a duplicate miner "dup" mines behind proxy "alice"
    Then miner "dup" has 3 shares rejected with "duplicate-share"
    When the miners stop
    Then every share the miners saw accepted has exactly one ehash:shares record with proxy "alice"'s key and the amount its hash is worth
    And no ehash:shares record has a hash miner "dup" saw rejected

  Scenario: a share for a job of the previous tip is refused with stale-share and leaves no record
    When a stale miner "old" mines behind proxy "alice"
    And miner "old" has 3 accepted shares
    And a block is mined by bitcoind
    Then miner "old" has 1 shares rejected with "stale-share"
    And no ehash:shares record has a hash miner "old" saw rejected

  Scenario: a share that meets the network target becomes a block and every miner moves to the new tip
    Given an uncapped honest miner "fast" behind proxy "alice"
    And an honest miner "slow" behind proxy "alice"
    When the pool finds a block
    Then the new block's coinbase pays the pool's payout address
    And every miner got work on the new tip

  Scenario: a miner whose request ids are JSON strings gets every answer with the id it sent, and mines beside an honest one
    Given an honest miner "honest" behind proxy "alice"
    And a string-ids miner "strings" mining behind proxy "alice"
    When miners "strings" and "honest" each have 3 accepted shares
    And the miners stop
    Then every share the miners saw accepted has exactly one ehash:shares record with proxy "alice"'s key and the amount its hash is worth

  Scenario: a miner that suggests a difficulty gets shares no easier than that, beside an honest one
    Given an honest miner "honest" behind proxy "alice"
    And a miner "picky" behind proxy "alice" that suggests difficulty 0.0002
    When miners "picky" and "honest" each have 4 accepted shares
    And the miners stop
    Then every share miner "picky" saw accepted has difficulty at least 0.0002
    And every share the miners saw accepted has exactly one ehash:shares record with proxy "alice"'s key and the amount its hash is worth

  Scenario: malformed SV1 input closes only that miner; a garbage SV2 frame closes only that connection
    Given an honest miner "good" behind proxy "alice"
    When miner "good" has 3 accepted shares
    And the accepted shares of miner "good" are counted
    And a malformed miner "bad" mines behind proxy "alice"
    Then miner "bad" is disconnected by the proxy
    And proxy "alice" logged "malformed SV1 input"
    When a client sends a garbage SV2 frame to the pool
    Then the pool counted a "protocol-error" disconnect
    And miner "good" gets 5 more shares accepted

  Scenario: with Redis stopped shares are refused and none is acknowledged without a record; mining resumes when it is back
    Given an honest miner "m" behind proxy "alice"
    When miner "m" has 3 accepted shares
    And redis is stopped
    Then miner "m" has 2 shares rejected with "ehash-record-unavailable"
    When the accepted shares of miner "m" are counted
    And redis is started again
    Then miner "m" gets 3 more shares accepted
    When the miners stop
    Then every share the miners saw accepted has exactly one ehash:shares record with proxy "alice"'s key and the amount its hash is worth
    And no ehash:shares record has a hash miner "m" saw rejected

  Scenario: a pool that starts while bitcoind is down waits for it, and mining resumes once bitcoind is back
    Given an honest miner "m" behind proxy "alice"
    When miner "m" has 3 accepted shares
    And the pool and then bitcoind are stopped
    Then the pool, started again, waits for bitcoind and becomes ready once bitcoind starts
    When the accepted shares of miner "m" are counted
    Then miner "m" gets 3 more shares accepted
    When the miners stop
    Then every share the miners saw accepted has exactly one ehash:shares record with proxy "alice"'s key and the amount its hash is worth

  Scenario: a miner started with --reconnect mines again after its proxy was down for 5 seconds, and never exits
    Given a reconnecting honest miner "r" behind proxy "alice"
    When miner "r" has 3 accepted shares
    And proxy "alice" is stopped for 5 seconds and started again
    And the accepted shares of miner "r" are counted
    Then miner "r" gets 3 more shares accepted
    And miner "r" is still running, never restarted, and logged connecting again
    When the miners stop
    Then every share the miners saw accepted has exactly one ehash:shares record with proxy "alice"'s key and the amount its hash is worth

  Scenario: a proxy that expects another pool authority key: its miners get an SV1 error naming the refusal, and other proxies keep mining
    Given an honest miner "good" behind proxy "alice"
    And a proxy "mallory" that expects a different pool authority key
    When miner "good" has 3 accepted shares
    And the accepted shares of miner "good" are counted
    Then a miner "lost" behind proxy "mallory" is refused with an SV1 error saying "certificate does not verify against pool_authority_public_key"
    And proxy "mallory" logged "wrong authority key?"
    And miner "good" gets 3 more shares accepted

  Scenario: the pool crashes and comes back: the proxy reconnects upstream and the miner keeps mining
    Given an honest miner "m" behind proxy "alice"
    When miner "m" has 3 accepted shares
    And the accepted shares of miner "m" are counted
    And the pool is killed with SIGKILL
    Then the supervisor restarts the pool
    And proxy "alice" logged "upstream connection lost"
    And miner "m" gets 5 more shares accepted
    When the miners stop
    Then every share the miners saw accepted has exactly one ehash:shares record with proxy "alice"'s key and the amount its hash is worth
