@mining @limits @serial
Feature: One misbehaving client cannot hurt the others

  Background:
    Given the pool will allow 8 connections per IP, 100 shares per second per channel and 1000 ms to set up a connection
    And the pool will allow 10 new connections per second per address, 20 at once
    And a signet stack with a pool
    And a proxy "alice" with a locking key
    And an honest miner "honest" behind proxy "alice"

  Scenario: clients flooding shares past the rate limit are cut off while the honest miner keeps mining
    When miner "honest" has 3 accepted shares
    And the accepted-share rate of miner "honest" is measured for 4 seconds
    And SV2 clients flood shares for 4 seconds while the rate of miner "honest" is measured
    Then the pool counted a "share-rate-limit" disconnect

  Scenario: connections that never finish the handshake are closed at the deadline, those past the per-IP limit refused
    When miner "honest" has 3 accepted shares
    And the accepted shares of miner "honest" are counted
    And 10 clients connect to the pool and never finish the handshake
    Then the pool counted a "handshake-deadline" disconnect
    And the pool refused connections beyond its per-IP limit
    And miner "honest" gets 5 more shares accepted

  Scenario: a message above the size limit closes only that connection
    When miner "honest" has 3 accepted shares
    And the accepted shares of miner "honest" are counted
    And a client sends a 100000-byte SV2 message to the pool
    Then the pool counted a "oversize-message" disconnect
    And miner "honest" gets 5 more shares accepted

  Scenario: a header declaring a message above the size limit closes the connection before its body is read
    When miner "honest" has 3 accepted shares
    And the accepted shares of miner "honest" are counted
    And a set-up client sends only the header of a 16000000-byte SV2 message to the pool
    Then the pool counted a "oversize-message" disconnect
    And miner "honest" gets 5 more shares accepted
