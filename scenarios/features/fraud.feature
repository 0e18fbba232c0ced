@fraud @serial
Feature: Template fraud: operators who declare their own templates are paid only for templates Bitcoin Core would accept

  An operator may build its own templates from its own bitcoind, declare them to the pool's
  job declarator and mine them as custom jobs. The pool checks only cheap things inline
  (token, tip, nbits, time, its payout); a share on a declared template is accepted like any
  other and its quote waits for the audit. The auditor asks Bitcoin Core, and the mint pays
  only templates with a valid verdict. Each fraud below is put, with rust-bitcoin, into an
  otherwise real template of the fraudulent operator's node; honest operators keep mining
  and being paid in the same stack. Every node is a real bitcoind on the private signet,
  connected to the pool's over P2P.

  Background:
    Given a signet stack with the pool side
    And operator nodes "mallory" and "dave" on the pool's chain
    And a faucet payment in the mempool of every node

  Scenario: a declaring proxy's farm of 12 miners declares over one job declaration connection, past the pool's 8 per address, and every miner mines a declared job
    Given a proxy "dave" with a locking key declaring templates from node "dave"
    When 12 honest farm miners at 50000 H/s start behind proxy "dave"
    Then every farm miner has 1 accepted share
    And the pool refused no job declaration connection

  Scenario Outline: a declared template with <fraud> earns accepted shares but FAILED quotes with Bitcoin Core's reason, its block is refused, and honest operators are paid
    Given a proxy "mallory" with a locking key declaring templates from node "mallory" with fraud "<fraud>"
    And an uncapped honest miner "x" behind proxy "mallory"
    When the pool refuses a block built on a template of "mallory"
    Then bitcoind refused it with "<reason>" and no node's chain moved
    And every quote of "mallory" ends FAILED with "<reason>" and its wallet mints nothing
    And every template of "mallory" is in audit:dead as a declared template with "<reason>"
    And the verdict on "<fraud>" matches its snapshot
    Given a proxy "alice" with a locking key
    And a proxy "dave" with a locking key declaring templates from node "dave"
    And an honest miner "a" behind proxy "alice"
    And an honest miner "d" behind proxy "dave"
    When miners "a" and "d" each have 2 accepted shares
    And the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it
    And every quote of "dave" becomes PAID and its wallet mints it
    And no ehash was minted for a template without a valid verdict

    Examples:
      | fraud                    | reason                               |
      | missing-input            | bad-txns-inputs-missingorspent       |
      | double-spend             | bad-txns-inputs-missingorspent       |
      | coinbase-overclaim       | bad-cb-amount                        |
      | over-weight              | bad-blk-weight                       |
      | wrong-witness-commitment | bad-witness-merkle-match             |
      | immature-coinbase-spend  | bad-txns-premature-spend-of-coinbase |
      | non-final                | bad-txns-nonfinal                    |

  Scenario Outline: <refused> with <fraud> are refused inline with <code> and earn no quote; an honest declaring operator keeps mining and is paid
    Given a proxy "mallory" with a locking key declaring templates from node "mallory" with fraud "<fraud>"
    And an honest miner "x" behind proxy "mallory"
    And a proxy "dave" with a locking key declaring templates from node "dave"
    And an honest miner "d" behind proxy "dave"
    Then proxy "mallory" gets its <refused> refused with "<code>", as the pool counts them
    When miner "d" has 3 accepted shares
    Then miner "x" has no accepted share and "mallory" has no quote
    When the miners stop
    Then every quote of "dave" becomes PAID and its wallet mints it

    Examples:
      | fraud               | refused      | code                                    |
      | no-pool-payout      | declarations | invalid-coinbase-tx                     |
      | stale-tip           | declarations | stale-chain-tip                         |
      | reused-token        | declarations | invalid-mining-job-token                |
      | undeclared-coinbase | custom-jobs  | invalid-job-param-value-coinbase-prefix |
