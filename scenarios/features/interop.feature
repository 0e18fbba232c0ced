@network @interop @serial
Feature: Interoperability: SRI's translator (translator_sv2 from crates.io) in front of the pool

  A standard SV2 client: its shares are accepted and, since it sends no locking key, earn no
  ehash. It keeps its upstream connection while it waits for its first miner, after its last
  miner leaves, and with a quiet shared channel; the pool must not cut it for that.

  Background:
    Given the pool will allow 8 connections per IP, 100 shares per second per channel and 1000 ms to set up a connection
    And a signet stack with a pool
    And a proxy "alice" with a locking key
    And an honest miner "honest" behind proxy "alice"

  Scenario: one channel per miner: the first miner arrives after the deadline, the last leaves, and the translator keeps serving
    Given SRI's translator "sri" in front of the pool, one channel per miner
    When the pool's set-up deadline passes for everything connected so far
    And an honest miner "first" starts behind proxy "sri"
    Then miner "first" has 3 accepted shares
    When miner "first" stops
    And the pool's set-up deadline passes for everything connected so far
    And an honest miner "second" starts behind proxy "sri"
    Then miner "second" has 3 accepted shares
    And translator "sri" is still running, never restarted
    And miner "honest" has 3 accepted shares
    And every ehash:shares record is locked to proxy "alice"'s key

  Scenario: a shared channel with no miners stays quiet past the deadline, then serves a miner
    Given SRI's translator "shared" in front of the pool, its miners sharing one channel
    When the pool's set-up deadline passes for everything connected so far
    And an honest miner "late" starts behind proxy "shared"
    Then miner "late" has 3 accepted shares
    And translator "shared" is still running, never restarted
    And every ehash:shares record is locked to proxy "alice"'s key
