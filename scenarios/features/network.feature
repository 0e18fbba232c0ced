@network @serial
Feature: Hostile networks and standard clients: the pool protects itself without cutting well-behaved SV2 clients

  A standard SV2 client (SRI's translator, for one) keeps its upstream connection while it
  waits for its first miner, after its last miner leaves, and with a quiet channel. The pool's
  deadline protects it from connections that never finish the Noise handshake and
  SetupConnection; a set-up connection is not cut for having no channel or for being quiet.

  Background:
    Given the pool will allow 8 connections per IP, 100 shares per second per channel and 1000 ms to set up a connection
    And the pool will allow 32 channels per connection
    And the pool will allow 40 channels per address
    And the pool runs with a descriptor limit of 256
    And the pool will allow 10 new connections per second per address, 20 at once
    And a signet stack with a pool
    And a proxy "alice" with a locking key
    And an honest miner "honest" behind proxy "alice"

  Scenario: a set-up connection with no channel, or whose last channel was closed, outlives the deadline
    When miner "honest" has 3 accepted shares
    And the accepted shares of miner "honest" are counted
    And a plain SV2 client "waiting" sets up its connection and opens no channel
    And a plain SV2 client "closed" opens a channel and closes it
    And the pool's set-up deadline passes for everything connected so far
    Then plain SV2 client "waiting" still opens a channel
    And plain SV2 client "closed" still opens a channel
    And miner "honest" gets 3 more shares accepted

  Scenario: a job declaration connection that never sends SetupConnection is closed at the set-up deadline
    When miner "honest" has 3 accepted shares
    Then a client that finishes the Noise handshake on the job declaration port and says nothing is closed within 5000 ms
    And miner "honest" has 3 accepted shares

  Scenario: a connection opening channels past the cap gets too-many-channels; the others are unaffected
    When miner "honest" has 3 accepted shares
    And the accepted shares of miner "honest" are counted
    Then plain SV2 client "greedy" opens 32 channels and the next one is refused with "too-many-channels"
    And the pool counted a "channels-per-connection" refusal
    And miner "honest" gets 3 more shares accepted

  Scenario: miners streaming 10 MB each without a newline are closed alone; the proxy's memory stays bounded
    When miner "honest" has 3 accepted shares
    And the accepted shares of miner "honest" are counted
    And the memory peak of proxy "alice" is remembered
    And 3 clients each stream 10 MB without a newline to proxy "alice"
    Then proxy "alice" logged "without a newline"
    And the memory peak of proxy "alice" grew by less than 4 MB
    And miner "honest" gets 3 more shares accepted

  Scenario: 500 silent SV1 sockets on one proxy: a new miner of the same operator still connects and mines, and the silent ones are closed
    When miner "honest" has 3 accepted shares
    And 500 SV1 sockets connect to proxy "alice" and say nothing
    Then the pool holds no more connections than before them
    When an honest miner "late" starts behind proxy "alice"
    Then miner "late" has 3 accepted shares
    And the proxy closes the silent sockets at its subscribe deadline

  # With 256 descriptors the pool caps mining connections at 128 (it keeps 128 for job
  # declaration, bitcoind, Redis and /health), so its descriptors never run out under it.
  Scenario: at its connection cap, set by its descriptor limit, the pool refuses newcomers, makes room by closing the oldest channel-less connections past the deadline, never an honest miner's, and keeps templates fresh and /health answering
    When miner "honest" has 3 accepted shares
    And 160 plain SV2 clients from 40 addresses set up connections, open no channel and wait
    Then the pool counted a "connections-total" refusal
    And the pool holds at most 129 connections
    And the pool logged at most 10 refusal or accept-error lines
    And the pool's /health answers
    Then a newcomer is admitted by closing the oldest idle connection past the deadline
    And the pool counted a "evicted" refusal
    And the pool holds at most 129 connections
    When bitcoind mines a block on the tip
    Then every miner got work on the new tip
    When the accepted shares of miner "honest" are counted
    Then miner "honest" gets 3 more shares accepted

  Scenario: a burst of connections from one address past the rate limit is refused and counted; honest miners are unaffected
    When miner "honest" has 3 accepted shares
    And the accepted shares of miner "honest" are counted
    And 40 clients connect to the pool at once from one address and wait
    Then the pool counted a "connection-rate" refusal
    And miner "honest" gets 3 more shares accepted

  Scenario: a farm of 20 miners behind one proxy shares one pool connection, below the pool's per-address limit of 8
    When miner "honest" has 3 accepted shares
    And 20 honest farm miners at 50000 H/s start behind proxy "alice"
    Then every farm miner has 1 accepted share
    And the pool holds at most 1 connections
    And miner "honest" has 3 accepted shares

  Scenario: on a connection shared by several channels, the one past the share rate is closed alone
    When miner "honest" has 3 accepted shares
    Then a plain SV2 client flooding shares on one of its two channels gets only that channel closed with "share-rate-limit"
    And miner "honest" has 3 accepted shares

  Scenario: one address past its channel cap over several connections gets too-many-channels; another address still opens
    When miner "honest" has 3 accepted shares
    Then plain SV2 clients from "127.0.2.1" open 40 channels over two connections, and the next is refused with "too-many-channels"
    And the pool counted a "channels-per-ip" refusal
    And a plain SV2 client from "127.0.2.2" still opens a channel
    And miner "honest" has 3 accepted shares
