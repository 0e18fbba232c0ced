@supervisor
Feature: The supervisor starts, watches, restarts and isolates processes

  Scenario: bitcoind killed with SIGKILL is restarted by the supervisor and keeps its chain
    Given a regtest stack
    And 5 blocks were mined to a new address
    When bitcoind is killed with SIGKILL
    Then the supervisor restarts bitcoind
    And the chain height and tip are as before the kill

  Scenario: two stacks run at the same time without sharing ports or directories
    Given a regtest stack "a"
    And a signet stack "b"
    Then the stacks use different ports and directories
    When 2 blocks are mined on stack "a"
    Then stack "a" is at height 2 above the pre-mined chain
    And stack "b" is at height 0 above the pre-mined chain

  Scenario: a process that exits during start-up fails the start with its own log lines
    When a stack is started whose bitcoind gets the unknown option "-frobnicate"
    Then the start fails with an error that quotes "frobnicate" from bitcoind's log

  Scenario: a paused bitcoind stops answering and answers again once resumed
    Given a regtest stack
    When bitcoind is paused
    Then bitcoind RPC does not answer within 300 ms
    When bitcoind is resumed
    Then bitcoind RPC answers
