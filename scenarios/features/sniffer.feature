@sniffer @serial
Feature: The SV2 sniffer: the harness terminates Noise between the proxy and the pool, records every message, and cuts a connection at a chosen message

  The harness holds the pool's authority key, so the sniffer answers the proxy's handshake as
  the pool and opens its own connection to the pool. The recorded flows are pinned as insta
  snapshots in fixtures/snapshots: a protocol change shows up there as a reviewed diff.

  Background:
    Given a signet stack with a pool
    And the proxies reach the pool through the SV2 sniffer
    And a proxy "alice" with a locking key

  Scenario: the set-up, ehash extension, channel-open, share and block-found flows match their reviewed snapshots
    Given an uncapped honest miner "fast" behind proxy "alice"
    When the pool finds a block
    Then the SV2 "extension negotiation" flow matches its snapshot
    And the SV2 "channel open" flow matches its snapshot
    And the SV2 "share" flow matches its snapshot
    And the SV2 "block found" flow matches its snapshot

  # The miner is told its share was rejected (the proxy never got the answer), while the
  # operator's key holds the record and its quote: the ehash is not lost, only unacknowledged.
  Scenario: a connection cut between a share and its answer: the share has one record if the pool accepted it, none if it refused it, and mining resumes
    Given an honest miner "m" behind proxy "alice"
    When miner "m" has 3 accepted shares
    And the accepted shares of miner "m" are counted
    And the sniffer cuts the connection of the next share before the pool's answer reaches the proxy
    Then the cut share has one ehash:shares record with proxy "alice"'s key if the pool accepted it, and none if it refused it
    And proxy "alice" logged "upstream connection lost"
    And miner "m" has 1 shares rejected with "upstream-disconnected"
    And miner "m" gets 3 more shares accepted
    When the miners stop
    Then every share the miners saw accepted has exactly one ehash:shares record with proxy "alice"'s key and the amount its hash is worth

  Scenario: every message delayed, then every connection cut: shares are still accepted late, the proxy reconnects and mining resumes
    Given an honest miner "m" behind proxy "alice"
    When miner "m" has 3 accepted shares
    And the sniffer delays every message by 300 ms
    And the accepted shares of miner "m" are counted
    Then miner "m" gets 3 more shares accepted
    And the sniffer saw a share answered only after 300 ms
    When the sniffer passes every message again
    And the sniffer cuts every connection
    Then proxy "alice" logged "upstream connection lost"
    When the accepted shares of miner "m" are counted
    Then miner "m" gets 3 more shares accepted
    When the miners stop
    Then every share the miners saw accepted has exactly one ehash:shares record with proxy "alice"'s key and the amount its hash is worth
