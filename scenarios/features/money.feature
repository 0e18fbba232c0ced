@money @serial
Feature: Money is never stuck, lost or shifted: honest work is paid after its tip is gone

  The auditor judges every template on its content with Bitcoin Core, whether it runs at once
  or long after the template's tip was replaced: its own bitcoind (the audit node, following
  the pool's node over P2P) is rewound to the template's parent for the proposal and restored
  after. So an auditor that was stopped, slow or backlogged across blocks still pays honest
  work and still fails fraud with Bitcoin Core's reason, and a template on a parent no node
  ever had is failed once the audit node has waited for it long enough.

  Scenario: the auditor stopped while the chain moves on 3 blocks: once it starts again every honest template is valid on its content and paid, and a fraudulent operator's templates of the same window fail with Bitcoin Core's reason
    Given a signet stack with the pool side
    And operator nodes "mallory" and "dave" on the pool's chain
    And a proxy "alice" with a locking key
    And a proxy "mallory" with a locking key declaring templates from node "mallory" with fraud "coinbase-overclaim"
    And a slow honest miner "m" behind proxy "alice"
    And an honest miner "x" behind proxy "mallory"
    When auditor "a" stops
    And bitcoind mines 3 blocks, one after each of miners "m" and "x" has a share recorded on the tip
    And the miners stop
    Then the templates of "alice" have at least 4 different parents
    And the templates of "mallory" have at least 4 different parents
    When auditor "a" starts again
    Then every quote of "alice" becomes PAID, none FAILED, and its wallet mints it
    And every quote of "mallory" ends FAILED with Bitcoin Core's "bad-cb-amount" and its wallet mints nothing
    And every verdict on a template of "alice" whose parent is no longer the tip was reached after rewinding the audit node
    And every verdict on a template of "mallory" whose parent is no longer the tip was reached after rewinding the audit node
    And the auditors counted at least 6 rewound audits

  Scenario: two auditors whose nodes answer late across blocks: every honest template is still valid on its content and paid
    Given a signet stack with a pool and a mint, and no auditor yet
    And auditor "a" with 2 workers, reaching its node through a fault proxy
    And auditor "b" with 2 workers, reaching its node through a fault proxy
    And a proxy "alice" with a locking key
    And a proxy "bob" with a locking key
    And a slow honest miner "m" behind proxy "alice"
    And a slow honest miner "n" behind proxy "bob"
    When every auditor's node answers 4000 ms late
    And bitcoind mines 3 blocks, one after each of miners "m" and "n" has a share recorded on the tip
    And the miners stop
    And every auditor's node answers at once again
    Then the templates of "alice" have at least 4 different parents
    And every quote of "alice" becomes PAID, none FAILED, and its wallet mints it
    And every quote of "bob" becomes PAID, none FAILED, and its wallet mints it
    And the auditors counted at least 2 rewound audits

  Scenario: a template on a parent no node has is failed as unknown-parent once the audit node has waited for it, and honest work goes on being paid
    Given a signet stack with a pool and a mint, and no auditor yet
    And auditor "a" with 2 workers, giving up on an unknown parent after 5 seconds
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    And an SV2 client "carol" with a locking key and a channel
    When client "carol" has 1 shares accepted with ntime an hour ahead of the tip's minimum
    And a template on a made-up parent is forged from a share of "carol" and appended with the pool's function
    Then the forged share's quote for "carol" ends FAILED with a reason starting "unknown-parent"
    And the auditors counted at least 1 unknown-parent audit
    When miner "m" has 2 accepted shares
    And the miners stop
    Then every quote of "alice" becomes PAID, none FAILED, and its wallet mints it

  Scenario Outline: a reorganisation <depth> block deep: miners get the branch's job within a second, shares made on the replaced tip are paid on their content, a share kept for it is stale, a replay on the branch is a duplicate
    Given a signet stack with the pool side
    And operator node "olga" on the pool's chain
    And a proxy "alice" with a locking key
    And a slow honest miner "m" behind proxy "alice"
    And an SV2 client "carol" with a locking key and a channel
    When auditor "a" stops
    And bitcoind mines <blocks>, one after miner "m" has a share recorded on the tip
    And client "carol" mines a share on the tip and keeps it
    And node "olga" replaces the pool's last <blocks> with a longer branch
    Then every miner gets a job on the branch's tip within 1 second of the switch
    When client "carol" submits its kept share
    Then the share is refused with "stale-share" and has no record
    When client "carol" has 1 shares accepted with ntime an hour ahead of the tip's minimum
    And client "carol" submits its last accepted share again
    Then the replay is refused with "duplicate-share" and the share has exactly one record
    When miner "m" has a share recorded on the tip
    And the miners stop
    And auditor "a" starts again
    Then the templates of "alice" include one on a replaced block
    And every quote of "alice" becomes PAID, none FAILED, and its wallet mints it
    And every verdict on a template of "alice" on a replaced block was reached after rewinding the audit node

    Examples:
      | depth | blocks   |
      | 1     | 1 block  |
      | 3     | 3 blocks |

  @allow.errors
  Scenario: a pool whose bitcoind forgot its newest blocks in a crash keeps its miners on the tip it had until the node has it again, so no share is made on a block only that node knows
    Given a signet stack with the pool side
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    When bitcoind mines 3 blocks, one after miner "m" has a share recorded on the tip
    And bitcoind is killed with SIGKILL while its peer "bitcoind-audit-a" is paused, and comes back without its newest blocks
    Then for 5 seconds miner "m" gets no job on a block below that tip
    When the paused peer is resumed
    Then bitcoind gets the tip it had again from its peer
    And miner "m" got no job on a block below that tip after the crash
    When miner "m" has a share recorded on the tip
    And the miners stop
    Then every quote of "alice" becomes PAID, none FAILED, and its wallet mints it
