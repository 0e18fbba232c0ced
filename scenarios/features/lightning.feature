@lightning
Feature: Core Lightning nodes on the private signet

  Real lightningd processes run on the stack's bitcoind, each behind a proxy that answers
  estimatesmartfee (the private signet has no fee data); the harness funds them from its
  faucet and mines the blocks a channel needs.

  Scenario: two Lightning nodes open a channel and pay an invoice on the private signet
    Given a signet stack
    And lightning nodes "pool" and "alice"
    When lightning node "pool" gets 1000000 sat from the faucet
    And lightning node "pool" opens a 500000 sat channel to "alice"
    Then the channel between "pool" and "alice" is normal
    When "alice" invoices 10000 sat and "pool" pays it
    Then the invoice is paid and "alice" holds 10000 sat in its channel
    And bitcoind's fee estimate was answered by the proxy

  Scenario: the pool's Lightning node starts with matured block rewards and funds a channel with them
    Given a signet stack with matured rewards for the pool's Lightning node
    Then the pool's Lightning node holds every matured reward, as Bitcoin Core counts coinbases 100 blocks deep that pay it
    Given lightning node "alice"
    When lightning node "pool" opens a 10000000 sat channel to "alice"
    Then the channel between "pool" and "alice" is normal
