@redis
Feature: Redis keeps stream entries across a crash (append-only file)

  Scenario: Redis killed with SIGKILL and restarted keeps a stream's entries
    Given a stack with Redis
    When 200 entries are appended to the stream "ehash:shares"
    And redis is killed with SIGKILL
    Then the supervisor restarts redis
    And the stream "ehash:shares" holds the same 200 entries

  @serial
  Scenario: The mint and the auditor trim what every reader acknowledged, and a reader that has not read holds its entries
    Given the mint trims what its readers acknowledged at once, reader "late" among them
    And a signet stack with the pool side
    And reader "late" joins the share and verdict streams from their start
    And a proxy "alice" with a locking key
    And an honest miner "m" behind proxy "alice"
    When miner "m" has 3 accepted shares
    Then every quote of "alice" becomes PAID and its wallet mints it
    And Redis trims the audit tasks every reader acknowledged
    When the miners stop
    Then Redis still holds every share record and verdict, none read by reader "late"
    When reader "late" reads and acknowledges every share record and verdict
    Then Redis trims the share records and verdicts every reader acknowledged
    And every quote of "alice" becomes PAID and its wallet mints it
    And the wallet of "alice" holds exactly what its accepted shares were worth
