@chain
Feature: Chains start from their pre-mined cache and mine real blocks

  Each stack copies a chain pre-mined once per machine (past coinbase maturity, coinbases
  paying the harness faucet) and runs a real bitcoind on it.

  Scenario Outline: a <chain> stack starts from its cached chain and mines blocks to an address
    Given a <chain> stack
    Then the chain is "<chain>" at the pre-mined height
    When 3 blocks are mined to a new address
    Then the height has risen by 3
    And each new block's coinbase pays the new address

    Examples:
      | chain   |
      | signet  |
      | regtest |

  Scenario Outline: the faucet pays an address on <chain> and the payment confirms
    Given a <chain> stack
    When the faucet sends 1.25 BTC to a new address
    Then the payment is in the mempool
    When 1 block is mined
    Then the payment is confirmed with 1 confirmation
    When the faucet sends 0.5 BTC to a new address
    And 2 blocks are mined
    Then the payment is confirmed with 2 confirmations

    Examples:
      | chain   |
      | signet  |
      | regtest |
