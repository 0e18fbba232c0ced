@redis
Feature: Redis keeps stream entries across a crash (append-only file)

  Scenario: Redis killed with SIGKILL and restarted keeps a stream's entries
    Given a stack with Redis
    When 200 entries are appended to the stream "ehash:shares"
    And redis is killed with SIGKILL
    Then the supervisor restarts redis
    And the stream "ehash:shares" holds the same 200 entries
