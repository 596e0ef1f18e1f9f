package cluster

// ChangeLogLen is changeLogLen, for the tests.
const ChangeLogLen = changeLogLen
