@network @serial
Feature: A farm of a thousand miners behind one proxy, all on one upstream connection

  One miner process runs a thousand simulated SV1 miners, one connection each, hashed by one
  shared thread. Their proxy opens one extended channel per miner, all on its one SV2
  connection to the pool. Shares pay from 12 leading zero bits here, so that a thousand
  miners sharing one core each find a share in seconds.

  Background:
    Given the pool pays shares from 12 leading zero bits
    And a signet stack with a pool
    And a proxy "alice" with a locking key
    And an honest miner "honest" behind proxy "alice"
    And a proxy "farm" with a locking key, announcing 1000 H/s per miner

  Scenario: 1,000 concurrent SV1 miners on one proxy each get work and an accepted share on a channel of their own; an honest miner behind another proxy keeps mining
    When miner "honest" has 3 accepted shares
    And the accepted shares of miner "honest" are counted
    And 1000 simulated miners in one process "thousand" at 1000 H/s each start behind proxy "farm"
    Then each of the 1000 miners of "thousand" gets work and an accepted share within 120 s
    And the ehash records of miner "thousand"'s shares name one channel per connection, 1000 in all, locked to proxy "farm"'s key
    And the pool holds at most 2 connections
    And miner "honest" gets 3 more shares accepted
