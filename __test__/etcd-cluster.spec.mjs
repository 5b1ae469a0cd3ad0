// The etcd test harness itself: clusters start, serve etcdctl, survive the loss of their leader,
// take TLS and auth, and go away when stopped.
import test from 'ava'
import { existsSync } from 'node:fs'
import { startCluster } from './etcd-cluster.mjs'

async function started(t, options) {
  const cluster = await startCluster(options)
  t.teardown(() => cluster.stop())
  return cluster
}

test('a 1-member cluster serves puts and gets', async (t) => {
  const cluster = await started(t, { members: 1 })
  t.is(cluster.endpoints.length, 1)
  t.regex(cluster.url('/x'), /^etcd:\/\/127\.0\.0\.1:\d+\/x$/)
  await cluster.ctl(['put', '/k', 'v1'])
  t.is(await cluster.ctl(['get', '--print-value-only', '/k']), 'v1\n')
  t.is(await cluster.leader(), 0)
  const dir = cluster.dir
  await cluster.stop()
  await cluster.stop()
  t.false(existsSync(dir))
})

test('a 3-member cluster keeps serving when its leader is killed, and takes it back', async (t) => {
  const cluster = await started(t, { members: 3 })
  t.is(new Set(cluster.endpoints).size, 3)
  t.regex(cluster.url('app'), /^etcd:\/\/(127\.0\.0\.1:\d+,){2}127\.0\.0\.1:\d+\/app$/)
  for (let i = 0; i < 3; i++) {
    await cluster.ctl(['put', `/k${i}`, `v${i}`], { endpoints: [cluster.endpoints[i]] })
  }
  for (let i = 0; i < 3; i++) {
    t.is(await cluster.ctl(['get', '--print-value-only', '/k0'], { endpoints: [cluster.endpoints[i]] }), 'v0\n')
  }
  const leader = await cluster.leader()
  await cluster.kill(leader)
  const next = await cluster.leader()
  t.not(next, leader)
  const other = [0, 1, 2].find((i) => i !== leader && i !== next)
  await cluster.ctl(['put', '/after', 'kill'], { endpoints: [cluster.endpoints[other]] })
  t.is(await cluster.ctl(['get', '--print-value-only', '/after'], { endpoints: [cluster.endpoints[next]] }), 'kill\n')
  await cluster.restart(leader)
  t.is(
    await cluster.ctl(['get', '--consistency=s', '--print-value-only', '/after'], {
      endpoints: [cluster.endpoints[leader]],
    }),
    'kill\n',
  )
})

test('a paused member answers nothing until resumed; the others go on', async (t) => {
  const cluster = await started(t, { members: 3 })
  await cluster.pause(1)
  await t.throwsAsync(cluster.ctl(['get', '/k'], { endpoints: [cluster.endpoints[1]], timeout: '1s' }))
  await cluster.leader()
  await cluster.ctl(['put', '/k', 'v'])
  await cluster.resume(1)
  t.is(await cluster.ctl(['get', '--print-value-only', '/k'], { endpoints: [cluster.endpoints[1]] }), 'v\n')
})

test('tls: etcdctl with --cacert of the throwaway CA reaches the cluster', async (t) => {
  const cluster = await started(t, { members: 1, tls: true })
  t.regex(cluster.url('/p'), /^etcds:\/\//)
  t.true(existsSync(cluster.ca))
  await cluster.ctl(['put', '/k', 'secure'])
  t.is(await cluster.ctl(['get', '--print-value-only', '/k']), 'secure\n')
})

test('auth: app reads and writes /app only; other cannot touch /app', async (t) => {
  const cluster = await started(t, { members: 1, auth: true })
  t.is(cluster.users.app.password, 'app-secret')
  await cluster.ctl(['put', '/app/k', 'v'], { user: 'app' })
  t.is(await cluster.ctl(['get', '--print-value-only', '/app/k'], { user: 'app' }), 'v\n')
  await t.throwsAsync(cluster.ctl(['put', '/elsewhere', 'v'], { user: 'app' }), { message: /permission denied/ })
  await t.throwsAsync(cluster.ctl(['get', '/app/k'], { user: 'other' }), { message: /permission denied/ })
  await cluster.ctl(['put', '/other/k', 'v'], { user: 'other' })
  await t.throwsAsync(cluster.ctl(['get', '/app/k'], { user: null }), { message: /user name is empty/ })
})

test('a member that exits before it is ready fails the start with its log tail', async (t) => {
  const error = await t.throwsAsync(startCluster({ members: 1, etcdArgs: ['--no-such-flag'] }))
  t.regex(error.message, /etcd member m0 exited before it was ready/)
  t.regex(error.message, /no-such-flag/)
  await t.throwsAsync(startCluster({ members: 0 }), { instanceOf: RangeError })
})
