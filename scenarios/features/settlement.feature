@settlement @serial
Feature: Quote settlement: every recorded share becomes a quote, PENDING until its template is audited, PAID only for valid templates, and the operator's wallet mints exactly that

  The mint (a cdk Cashu mint for the unit ehash) turns each ehash:shares record into one quote
  locked to the operator's key; the auditor checks each template with Bitcoin Core; the mint
  pays a valid template's quotes and never an invalid one's; the proxy's wallet finds its
  quotes with a signed lookup and mints the PAID ones. Miners really hash on the private
  signet in every scenario.

  Scenario: quotes are PENDING until their template's verdict and PAID after; the wallet holds exactly what the shares were worth
    Given a signet stack with a pool and a mint, and no auditor yet
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    When miner "m" has 4 accepted shares
    Then every quote of "alice" is PENDING and its wallet has minted nothing
    When auditor "a" starts with 2 workers
    And the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it
    And the wallet of "alice" holds exactly what its accepted shares were worth

  Scenario: with a settlement delay, quotes stay PENDING at least that long after the verdict, then are PAID
    Given the mint pays quotes 4 seconds after a valid verdict
    And a signet stack with the pool side
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    When miner "m" has 3 accepted shares
    And the miners stop
    Then no quote of "alice" is PAID earlier than 4 seconds after its template's verdict
    And every quote of "alice" becomes PAID and its wallet mints it

  Scenario: one operator's lookup never shows another's quotes, and a key cannot mint another key's quote
    Given a signet stack with the pool side
    And a proxy "alice" with a locking key
    And a proxy "bob" with a locking key
    And an honest miner "a1" behind proxy "alice"
    And an honest miner "b1" behind proxy "bob"
    And an SV2 client "carol" with a locking key and a channel
    When client "carol" has 2 shares accepted with ntime an hour ahead of the tip's minimum
    And miners "a1" and "b1" each have 3 accepted shares
    Then the lookups of "alice", "bob" and "carol" return disjoint quotes, each only for shares locked to its key
    And "bob"'s key cannot mint a quote of "carol": the mint refuses the signature
    And "carol"'s own key mints that quote

  Scenario: quote creation over HTTP, and replayed, stale or forged lookups are refused with clear errors
    Given a signet stack with the pool side
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    When miner "m" has 2 accepted shares
    And a client asks the mint for a mining_share quote over HTTP
    Then the mint refuses it with status 400, code 30001 and a detail saying "created only from the pool's share records"
    When a lookup for "alice"'s key is replayed
    Then the mint refuses it with status 401, code 30004 and a detail saying "replayed"
    When a lookup for "alice"'s key is signed five minutes ago
    Then the mint refuses it with status 401, code 30003 and a detail saying "from the mint's clock"
    When a lookup for "alice"'s key is signed by another key
    Then the mint refuses it with status 401, code 30002 and a detail saying "does not verify"
    When the accepted shares of miner "m" are counted
    Then miner "m" gets 2 more shares accepted

  Scenario: the mint killed with SIGKILL mid-run: every accepted share still has exactly one quote and the wallet's balance is right
    Given a signet stack with the pool side
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    When miner "m" has 3 accepted shares
    And the mint is killed with SIGKILL
    Then the supervisor restarts the mint
    When the accepted shares of miner "m" are counted
    Then miner "m" gets 3 more shares accepted
    When the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it
    And the wallet of "alice" holds exactly what its accepted shares were worth

  Scenario: two auditors, one killed while it holds a task: the task is reclaimed and every template gets exactly one verdict
    Given a signet stack with a pool and a mint, and no auditor yet
    And auditor "a" with 1 worker
    And auditor "b" with 1 worker
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    When auditor "a" is paused and the next audit task is delivered to it
    And auditor "a" is killed with SIGKILL
    Then every audit task gets exactly one verdict and none stays pending
    When the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it

  Scenario: Redis killed with SIGKILL and restarted from its append-only file: no record, quote or verdict is lost and settlement resumes
    Given the mint and the auditors trim nothing
    And a signet stack with the pool side
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    When miner "m" has 3 accepted shares
    Then every quote of "alice" becomes PAID and its wallet mints it
    When the share, task and verdict streams are remembered
    And redis is killed with SIGKILL
    Then the supervisor restarts redis
    And the share, task and verdict streams still hold every remembered entry
    When the accepted shares of miner "m" are counted
    Then miner "m" gets 3 more shares accepted
    When the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it
    And the wallet of "alice" holds exactly what its accepted shares were worth

  Scenario: a template the auditor finds invalid: its quotes end FAILED with Bitcoin Core's reason, the task is in audit:dead, nothing is minted for it
    Given a signet stack with the pool side
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    And an SV2 client "carol" with a locking key and a channel
    When client "carol" has 1 shares accepted with ntime an hour ahead of the tip's minimum
    And a template spending a missing output is forged from a share of "carol" and appended with the pool's function
    Then the forged share's quote for "carol" ends FAILED with "bad-txns-inputs-missingorspent"
    And the forged template's task is in audit:dead with "bad-txns-inputs-missingorspent"
    And "carol"'s key cannot mint the forged share's quote
    When miner "m" has 2 accepted shares
    And the miners stop
    Then every quote of "alice" becomes PAID and its wallet mints it

  Scenario: a template whose first share is itself a block is audited on its content, not refused as a duplicate (regtest: nearly every share is a block)
    Given a regtest stack with the pool side
    And an SV2 client "carol" with a locking key and a channel
    When client "carol" has 1 shares accepted with ntime an hour ahead of the tip's minimum
    Then the pool found a block
    And every quote of client "carol" becomes PAID with its template's verdict "proposal after rewinding 1 block | proposal"
